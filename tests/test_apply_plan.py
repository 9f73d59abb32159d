"""`apply` prints its plan, `apply --plan` changes nothing, and the refusals (a file that
would archive every active audience, a likely rename) leave every table of the state
database byte-for-byte as it was, on SQLite and PostgreSQL."""

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, select

from worker.config import load_config
from worker.plan import ApplyRefused
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import audience, write_config
from worker.testing.guarantees import error_lines, invoke

Dump = dict[str, list[tuple[Any, ...]]]


def _dump(url: str) -> Dump:
    """Every row of every table, in a stable order (the columns' values as stored)."""
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            # Sorted here rather than in SQL: PostgreSQL cannot order by a JSON column.
            return {
                name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()


@pytest.fixture
def applied(tmp_path: Path, shop: ShopSource, cli: None, state_url: str) -> Dump:
    """Two audiences applied and synced once (runs, snapshots and synced users exist);
    the dump of the state database after that."""
    shop.add([("u1", None, 1, 1, 0), ("u2", None, 1, 0, 0)])
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Order Completed", "a"), audience("High Value", "b")],
    )
    assert invoke("apply", str(path)).exit_code == 0
    assert invoke("sync").exit_code == 0
    before = _dump(state_url)
    assert before["sync_runs"] and before["synced_members"]
    return before


def _other_file(tmp_path: Path, shop: ShopSource, *audiences: dict[str, Any]) -> Path:
    return write_config(tmp_path, source_url=shop.url, audiences=audiences, name="other.yml")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# every audience moved to another file\n",
        "audiences: []\n",
    ],
    ids=["empty", "comments-only", "no-audiences"],
)
def test_a_file_archiving_every_audience_is_refused(
    tmp_path: Path, applied: Dump, state_url: str, text: str
) -> None:
    path = tmp_path / "empty.yml"
    path.write_text(text)
    result = invoke("apply", str(path))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "archive every active audience (high_value, order_completed)" in line
    assert "--allow-archive-all" in line
    assert "audience order_completed: archive" in result.stdout
    assert _dump(state_url) == applied

    allowed = invoke("apply", str(path), "--allow-archive-all")
    assert allowed.exit_code == 0, allowed.output
    assert "archived: high_value, order_completed" in allowed.stdout
    assert _dump(state_url) != applied


def test_a_likely_rename_is_refused_with_the_line_to_add(
    tmp_path: Path, shop: ShopSource, applied: Dump, state_url: str
) -> None:
    renamed = _other_file(
        tmp_path, shop, audience("Order Completed", "a"), audience("Big Spenders", "b")
    )
    result = invoke("apply", str(renamed))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "add the line `key: high_value` to the audience 'Big Spenders'" in line
    assert "--allow-new-key big_spenders" in line
    assert _dump(state_url) == applied

    # The fix the message names: the key is kept, only the name changes.
    fixed = _other_file(
        tmp_path,
        shop,
        audience("Order Completed", "a"),
        audience("Big Spenders", "b", key="high_value"),
    )
    result = invoke("apply", str(fixed))
    assert result.exit_code == 0, result.output
    assert "audience high_value: change\n  name: High Value -> Big Spenders" in result.stdout


def test_allow_new_key_creates_the_new_audience(
    tmp_path: Path, shop: ShopSource, applied: Dump, state_url: str
) -> None:
    renamed = _other_file(
        tmp_path, shop, audience("Order Completed", "a"), audience("Big Spenders", "b")
    )
    result = invoke("apply", str(renamed), "--allow-new-key", "big_spenders")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-3:] == [
        "created: big_spenders",
        "archived: high_value",
        "unchanged: order_completed",
    ]


def test_plan_prints_field_changes_and_changes_nothing(
    tmp_path: Path, shop: ShopSource, applied: Dump, state_url: str
) -> None:
    changed = _other_file(
        tmp_path,
        shop,
        audience("Order Completed", "a", schedule="every 30m", max_exit_fraction=0.2),
        audience("Newcomers", "c"),
    )
    result = invoke("apply", str(changed), "--plan")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[lines.index("audience order_completed: change") + 1 :][:2] == [
        "  schedule: every 2h -> every 30m",
        "  guard: 0.5 -> 0.2",
    ]
    assert "audience newcomers: create" in lines
    assert "audience high_value: archive" in lines
    assert lines[-2:] == [
        "plan: audiences 1 to create, 1 to change, 0 to revive, 1 to archive",
        "nothing changed (--plan)",
    ]
    assert _dump(state_url) == applied

    applied_now = invoke("apply", str(changed))
    assert applied_now.exit_code == 0
    # `apply` prints the same plan, then what it did.
    assert applied_now.stdout.strip().splitlines()[: len(lines) - 1] == lines[:-1]


def test_plan_json_for_review_bots(
    tmp_path: Path, shop: ShopSource, applied: Dump, state_url: str
) -> None:
    path = tmp_path / "empty.yml"
    path.write_text("audiences: []\n")
    result = invoke("apply", str(path), "--plan", "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["is_applied"] is False
    assert len(document["refusals"]) == 1
    assert {(i["kind"], i["name"], i["action"]) for i in document["items"]} == {
        ("audience", "order_completed", "archive"),
        ("audience", "high_value", "archive"),
    }
    assert _dump(state_url) == applied

    changed = _other_file(
        tmp_path,
        shop,
        audience("Order Completed", "a", schedule="every 30m"),
        audience("High Value", "b"),
    )
    document = json.loads(invoke("apply", str(changed), "--json").stdout)
    assert document["is_applied"] is True and document["refusals"] == []
    (item,) = [i for i in document["items"] if i["action"] == "change"]
    assert item == {
        "kind": "audience",
        "name": "order_completed",
        "action": "change",
        "changes": [{"field": "schedule", "before": "every 2h", "after": "every 30m"}],
    }


def test_the_service_refuses_inside_its_transaction(
    tmp_path: Path, applied: Dump, state_url: str, runtime: Runtime
) -> None:
    """`apply` computes the plan again in the transaction that writes it (a caller that
    skipped the plan, or a catalog that changed since, still gets the refusal)."""
    path = tmp_path / "empty.yml"
    path.write_text("audiences: []\n")
    with pytest.raises(ApplyRefused, match="archive every active audience") as caught:
        runtime.service.apply(load_config(path))
    assert [i.name for i in caught.value.plan.items] == ["high_value", "order_completed"]
    assert _dump(state_url) == applied
    report = runtime.service.apply(load_config(path), allow_archive_all=True)
    assert report.archived == ["high_value", "order_completed"]
