"""Ids are exact, end to end on SQLite and PostgreSQL: the id a destination receives is the
exact text the source returned. `' alice '`, `'alice'` and `'Alice'` are three users; the
padded one is counted as `padded_id` in the run's skipped rows, and still synced."""

from pathlib import Path

from worker.reports import ReportService
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import sync_all
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import sync_to_fake

KEY = "exact_ids"
IDS = (" alice ", "alice", "Alice", "bob\t")


def test_ids_that_differ_only_by_whitespace_or_case_are_different_users(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((user, f"{user.strip()}@example.com", 1, 0, 0) for user in IDS)
    sync_to_fake(runtime, tmp_path, shop, fake, "Exact Ids")

    [first] = sync_all(runtime)
    assert (first.status, first.members, first.entered, first.sent) == ("succeeded", 4, 4, 4)
    assert fake.state("ortto") == {KEY: dict.fromkeys(IDS, True)}
    assert sorted(item["user_id"] for item in fake.items("ortto")) == sorted(IDS)
    detail = ReportService(session_factory=runtime.sessions).run(first.run_id)
    assert dict(detail.run.skipped_rows) == {"padded_id": 2}

    # Nothing changed: nothing is sent (no id is read differently the second time).
    [second] = sync_all(runtime)
    assert (second.members, second.sent) == (4, 0)

    # 'alice' leaves; ' alice ' and 'Alice' stay members.
    shop.set_flag("a", ["alice"], 0)
    [third] = sync_all(runtime)
    assert (third.entered, third.exited, third.sent) == (0, 1, 1)
    assert fake.state("ortto") == {
        KEY: {" alice ": True, "alice": False, "Alice": True, "bob\t": True}
    }
