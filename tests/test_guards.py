"""The mass-exit guard's arithmetic."""

import pytest

from worker.service import mass_exit_reason


@pytest.mark.parametrize(
    ("members", "previous", "held", "exits", "fraction", "blocked"),
    [
        # Zero rows where the audience had members: a broken source, not an empty audience.
        (0, 10, 10, 10, 0.5, "no rows"),
        (0, 3, 0, 0, 0.5, "no rows"),
        (0, None, 5, 5, 0.5, "no rows"),
        (0, None, 0, 0, 0.5, None),
        (0, 0, 0, 0, 0.5, None),
        # Share of held members that would exit.
        (40, 100, 100, 60, 0.5, "60 of 100"),
        (50, 100, 100, 50, 0.5, None),
        (10, 1000, 1000, 990, 0.99, None),
        (10, 1000, 1000, 991, 0.99, "991 of 1000"),
        # Below 100 held members the share is ignored.
        (1, 99, 99, 98, 0.5, None),
        (1, 100, 100, 99, 0.5, "99 of 100"),
    ],
)
def test_mass_exit_reason(
    members: int,
    previous: int | None,
    held: int,
    exits: int,
    fraction: float,
    blocked: str | None,
) -> None:
    reason = mass_exit_reason(
        members=members,
        previous_members=previous,
        held_members=held,
        exits=exits,
        max_exit_fraction=fraction,
    )
    if blocked is None:
        assert reason is None
    else:
        assert reason is not None and blocked in reason and "--allow-mass-exit" in reason
