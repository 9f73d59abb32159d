"""Both ids (on SQLite and PostgreSQL, against the local fakes): a source returning `user_id`
and `anonymous_id` together. The identity is the user id when present, else the anonymous
id; the other travels with it and is sent; an anonymous id that changes alone is not a
membership change and sends nothing; the migration carries existing state over."""

from pathlib import Path

from sqlalchemy import create_engine, text

from worker import db
from worker.domain import SyncRequest
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import ortto_destination

KEY = "both_ids"
# c = 1: an anonymous member (no user id); otherwise a user whose anonymous id carries the
# version in column b, so changing b changes the anonymous id and nothing else.
QUERY = (
    "select case when c = 1 then null else user_id end as user_id, "
    "'anon-' || user_id || '-v' || b as anonymous_id, email from people where a = 1"
)


def _user(i: int) -> str:
    return f"u{i:03d}"


def _apply(runtime: Runtime, tmp_path: Path, shop: ShopSource, fake: FakeDestinations) -> None:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[
            {"name": "Both Ids", "source": "shop", "query": QUERY, "destinations": ["ortto"]}
        ],
        destinations={"ortto": ortto_destination(fake)},
    )
    apply_file(runtime, path)


def _ids(fake: FakeDestinations, start: int = 0) -> list[tuple[str | None, str | None, bool]]:
    return [
        (c.get("user_id"), c.get("anonymous_id"), c["traits"][KEY])
        for c in fake.items("ortto")[start:]
    ]


def test_the_other_id_travels_and_an_anonymous_id_change_sends_nothing(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, 1, 0, int(i >= 8)) for i in range(10))
    _apply(runtime, tmp_path, shop, fake)
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    assert runtime.service.sync_pair(pair, SyncRequest()).sent == 10
    assert sorted(_ids(fake), key=str) == sorted(
        [(_user(i), f"anon-{_user(i)}-v0", True) for i in range(8)]
        + [(None, f"anon-{_user(i)}-v0", True) for i in (8, 9)],
        key=str,
    )

    # The anonymous ids of users change: not a membership change, nothing is sent.
    shop.execute("update people set b = 1 where user_id in ('u000', 'u001')")
    summary = runtime.service.sync_pair(pair, SyncRequest())
    assert (summary.status, summary.entered, summary.exited, summary.sent) == (
        "succeeded",
        0,
        0,
        0,
    )
    assert len(fake.items("ortto")) == 10

    # A user leaving is told with both ids, the anonymous one as last sent.
    sent = len(fake.items("ortto"))
    shop.set_flag("a", [_user(0)], 0)
    assert runtime.service.sync_pair(pair, SyncRequest()).sent == 1
    assert _ids(fake, sent) == [(_user(0), "anon-u000-v0", False)]

    # A full run sends every member with its current anonymous id.
    sent = len(fake.items("ortto"))
    assert runtime.service.sync_pair(pair, SyncRequest(is_full=True)).sent == 9
    assert (_user(1), "anon-u001-v1", True) in _ids(fake, sent)


def test_the_migration_carries_existing_state_over(state_url: str) -> None:
    engine = create_engine(state_url)
    try:
        db.downgrade(state_url, "0005")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "insert into sources (id, name, url, statement_timeout_seconds) "
                    "values (1, 's', 'sqlite://', 1)"
                )
            )
            connection.execute(
                text(
                    "insert into destinations (id, name, type, settings) "
                    "values (1, 'd', 'file', '{}')"
                )
            )
            connection.execute(
                text(
                    "insert into audiences (id, key, name, source_id, query, schedule, "
                    "max_exit_fraction, is_archived, created_at, updated_at) values "
                    "(1, 'k', 'K', 1, 'select 1', 'every 1h', 0.5, false, "
                    "'2026-11-28 12:00:00', '2026-11-28 12:00:00')"
                )
            )
            connection.execute(
                text(
                    "insert into audience_destinations (id, audience_id, destination_id, "
                    "is_enabled) values (1, 1, 1, true)"
                )
            )
            connection.execute(
                text(
                    "insert into synced_members (audience_id, destination_id, member_id, "
                    "is_anonymous, is_member, email, run_id) values "
                    "(1, 1, 'u1', false, true, 'a@example.com', 7), "
                    "(1, 1, 'anon-2', true, false, null, 8)"
                )
            )
        db.upgrade(state_url)
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "select member_id, is_anonymous, is_member, email, run_id, anonymous_id "
                    "from synced_members order by member_id"
                )
            ).all()
            pair = connection.execute(
                text("select send_as, is_full_sync_owed from audience_destinations")
            ).one()
            space = connection.scalar(text("select space_id from audiences"))
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("anon-2", True, False, None, 8, None),
        ("u1", False, True, "a@example.com", 7, None),
    ]
    assert (pair[0], bool(pair[1])) == ("identify", False)
    assert space == "audience-sync"
