"""Tests of worker.batching: splitting by item count and encoded size."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.batching import batch_bounds, encoded_batches


@pytest.mark.parametrize(
    ("sizes", "max_items", "max_bytes", "overhead", "separator", "expected"),
    [
        ([], 10, 100, 0, 1, []),
        ([5], 10, 100, 0, 1, [(0, 1)]),
        ([10] * 5, 2, 1_000, 0, 1, [(0, 2), (2, 4), (4, 5)]),
        ([10] * 4, 1, 1_000, 0, 1, [(0, 1), (1, 2), (2, 3), (3, 4)]),
        ([10] * 4, 4, 1_000, 0, 1, [(0, 4)]),
        # 4 + 1 + 4 = 9 fits 9 exactly; the third would make 14.
        ([4, 4, 4], 10, 9, 0, 1, [(0, 2), (2, 3)]),
        # One byte less and only one item fits per range.
        ([4, 4, 4], 10, 8, 0, 1, [(0, 1), (1, 2), (2, 3)]),
        # The overhead counts once per range: 2 + 4 + 1 + 4 = 11 > 10.
        ([4, 4], 10, 10, 2, 1, [(0, 1), (1, 2)]),
        ([4, 4], 10, 11, 2, 1, [(0, 2)]),
        # No separator: 3 + 3 + 3 = 9.
        ([3, 3, 3, 3], 10, 9, 0, 0, [(0, 3), (3, 4)]),
        # Too large to fit alone: a range of its own, neighbours unaffected.
        ([1, 100, 1], 10, 10, 0, 1, [(0, 1), (1, 2), (2, 3)]),
        ([100], 10, 10, 0, 1, [(0, 1)]),
        ([100, 100], 10, 10, 0, 1, [(0, 1), (1, 2)]),
        # Count and bytes together: bytes cut first here, then count.
        ([2] * 7, 3, 5, 0, 1, [(0, 2), (2, 4), (4, 6), (6, 7)]),
        ([2] * 7, 3, 100, 0, 1, [(0, 3), (3, 6), (6, 7)]),
        # An empty item costs only its separator.
        ([0, 0, 0], 10, 2, 0, 1, [(0, 3)]),
    ],
)
def test_batch_bounds(
    sizes: list[int],
    max_items: int,
    max_bytes: int,
    overhead: int,
    separator: int,
    expected: list[tuple[int, int]],
) -> None:
    ranges = batch_bounds(
        sizes, max_items=max_items, max_bytes=max_bytes, overhead=overhead, separator=separator
    )
    assert [(r.start, r.stop) for r in ranges] == expected


def test_batch_bounds_needs_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="max_items"):
        list(batch_bounds([1], max_items=0, max_bytes=10))


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=60), max_size=200),
    max_items=st.integers(min_value=1, max_value=20),
    max_bytes=st.integers(min_value=1, max_value=200),
    overhead=st.integers(min_value=0, max_value=10),
)
def test_batch_bounds_cover_everything_once_within_limits(
    sizes: list[int], max_items: int, max_bytes: int, overhead: int
) -> None:
    ranges = list(batch_bounds(sizes, max_items=max_items, max_bytes=max_bytes, overhead=overhead))
    covered = [i for r in ranges for i in r]
    assert covered == list(range(len(sizes)))
    for r in ranges:
        assert 1 <= len(r) <= max_items
        encoded = overhead + sum(sizes[i] for i in r) + len(r) - 1
        # Over the byte limit only when one item is too large on its own.
        assert encoded <= max_bytes or len(r) == 1
    # Greedy: no range could have taken the next range's first item.
    for current, following in itertools.pairwise(ranges):
        grown = overhead + sum(sizes[i] for i in current) + len(current) + sizes[following.start]
        assert len(current) == max_items or grown > max_bytes


def test_encoded_batches_set_aside_what_cannot_be_sent() -> None:
    items: list[bytes | str] = [b"aa", "no user id", b"x" * 10, b"bb", b"cc", b"dd"]
    unsendable, batches = encoded_batches(
        items,
        max_items=2,
        max_bytes=100,
        max_item_bytes=5,
        overhead=2,
        too_large=lambda size: f"{size} bytes",
    )
    assert unsendable == [(1, "no user id"), (2, "10 bytes")]
    assert [batch.indexes for batch in batches] == [[0, 3], [4, 5]]
    assert [batch.join(b"[", b"]") for batch in batches] == [b"[aa,bb]", b"[cc,dd]"]
