"""The plan of an apply: a pure function of the catalog's values and the desired file,
tested by a table (what each item becomes, field by field, and what is refused)."""

from dataclasses import replace
from typing import Any

import pytest

from worker.config import AudienceSpec, Config, DestinationSpec, PairSpec, SourceSpec
from worker.payloads import DEFAULT_SPACE_ID, SendAs
from worker.plan import (
    Action,
    AudienceState,
    CatalogState,
    DestinationState,
    FieldChange,
    SourceState,
    compute_plan,
    same_query,
)

SHOP = SourceState("shop", "${SHOP_URL}", 300.0)
LOCAL = DestinationState("local", "file", {"type": "file", "path": "out.ndjson"})
QUERY_A = "select user_id from people where a = 1"
QUERY_B = "select user_id from people where b = 1"


def _state(key: str, query: str = QUERY_A, **values: Any) -> AudienceState:
    defaults: dict[str, Any] = {
        "key": key,
        "name": key.title(),
        "source": "shop",
        "query": query,
        "schedule": "every 2h",
        "destinations": ("local",),
        "max_exit_fraction": 0.5,
        "is_archived": False,
    }
    return AudienceState(**{**defaults, **values})


def _spec(key: str, query: str = QUERY_A, **values: Any) -> AudienceSpec:
    state = _state(key, query)
    defaults: dict[str, Any] = {
        "key": key,
        "name": state.name,
        "is_key_pinned": False,
        "source": "shop",
        "query": query,
        "schedule": "every 2h",
        "destinations": ("local",),
        "max_exit_fraction": 0.5,
    }
    return AudienceSpec(**{**defaults, **values})


def _config(*audiences: AudienceSpec, **destination_settings: Any) -> Config:
    settings = {"type": "file", "path": "out.ndjson", **destination_settings}
    return Config(
        sources=(SourceSpec("shop", "${SHOP_URL}", 300.0),),
        destinations=(DestinationSpec("local", "file", settings),),
        audiences=audiences,
    )


def _catalog(*audiences: AudienceState) -> CatalogState:
    return CatalogState(sources=(SHOP,), destinations=(LOCAL,), audiences=audiences)


def _actions(current: CatalogState, desired: Config, **flags: Any) -> dict[str, str]:
    plan = compute_plan(current, desired, **flags)
    return {f"{i.kind} {i.name}": str(i.action) for i in plan.items}


# (case, current catalog, desired file, {item: action}, refused)
CASES = [
    (
        "first apply creates everything",
        CatalogState(),
        _config(_spec("a")),
        {"source shop": "create", "destination local": "create", "audience a": "create"},
        False,
    ),
    (
        "the same file again changes nothing",
        _catalog(_state("a")),
        _config(_spec("a")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"},
        False,
    ),
    (
        "a schedule change",
        _catalog(_state("a")),
        _config(_spec("a", schedule="every 1h")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "change"},
        False,
    ),
    (
        "a dropped audience is archived while another stays",
        _catalog(_state("a"), _state("b", QUERY_B)),
        _config(_spec("a")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience b": "archive"},
        False,
    ),
    (
        "an archived audience back in the file is revived",
        _catalog(_state("a"), _state("b", QUERY_B, is_archived=True)),
        _config(_spec("a"), _spec("b", QUERY_B)),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience b": "revive"},
        False,
    ),
    (
        "an archived audience not in the file stays out of the plan",
        _catalog(_state("a"), _state("b", QUERY_B, is_archived=True)),
        _config(_spec("a")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"},
        False,
    ),
    (
        "a file without audiences archives every active one: refused",
        _catalog(_state("a"), _state("b", QUERY_B)),
        _config(),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "archive"}
        | {"audience b": "archive"},
        True,
    ),
    (
        "an empty catalog and an empty file: nothing to refuse",
        CatalogState(),
        _config(),
        {"source shop": "create", "destination local": "create"},
        False,
    ),
    (
        "only archived audiences and an empty file: nothing active to lose",
        _catalog(_state("a", is_archived=True)),
        _config(),
        {"source shop": "unchanged", "destination local": "unchanged"},
        False,
    ),
    (
        "a rename without key: refused",
        _catalog(_state("a"), _state("b", QUERY_B)),
        _config(_spec("a"), _spec("b2", QUERY_B)),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience b2": "create", "audience b": "archive"},
        True,
    ),
    (
        "a rename whose query differs only in spacing: refused",
        _catalog(_state("a"), _state("b", QUERY_B)),
        _config(_spec("a"), _spec("b2", QUERY_B.replace(" where ", "\n   where  "))),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience b2": "create", "audience b": "archive"},
        True,
    ),
    (
        "a new audience with a new query next to an archive: not a rename",
        _catalog(_state("a"), _state("b", QUERY_B)),
        _config(_spec("a"), _spec("c", "select user_id from people where c = 1")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience c": "create", "audience b": "archive"},
        False,
    ),
    (
        "a new audience with the query of one that stays: not a rename",
        _catalog(_state("a")),
        _config(_spec("a"), _spec("a2")),
        {"source shop": "unchanged", "destination local": "unchanged", "audience a": "unchanged"}
        | {"audience a2": "create"},
        False,
    ),
    (
        "a destination's setting changes",
        _catalog(_state("a")),
        _config(_spec("a"), path="other.ndjson"),
        {"source shop": "unchanged", "destination local": "change", "audience a": "unchanged"},
        False,
    ),
]


@pytest.mark.parametrize(
    ("current", "desired", "actions", "is_refused"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_table(
    current: CatalogState, desired: Config, actions: dict[str, str], is_refused: bool
) -> None:
    plan = compute_plan(current, desired)
    assert {f"{i.kind} {i.name}": str(i.action) for i in plan.items} == actions
    assert plan.is_refused is is_refused


def test_every_audience_field_is_named_with_before_and_after() -> None:
    current = _catalog(_state("a"))
    desired = _config(
        _spec(
            "a",
            QUERY_B,
            name="Renamed",
            schedule="*/15 * * * *",
            destinations=("local", "crm"),
            max_exit_fraction=0.2,
        )
    )
    (audience,) = [i for i in compute_plan(current, desired).items if i.kind == "audience"]
    assert audience.action == Action.CHANGE
    assert audience.changes == (
        FieldChange("name", "A", "Renamed"),
        FieldChange("query", QUERY_A, QUERY_B),
        FieldChange("schedule", "every 2h", "*/15 * * * *"),
        FieldChange("destinations", ("local",), ("crm", "local")),
        FieldChange("guard", 0.5, 0.2),
    )


def test_source_and_destination_changes_are_field_by_field() -> None:
    current = _catalog(_state("a"))
    desired = replace(
        _config(_spec("a"), path="b.ndjson"),
        sources=(SourceSpec("shop", "${OTHER_URL}", 60.0),),
    )
    items = {i.name: i for i in compute_plan(current, desired).items}
    assert items["shop"].changes == (
        FieldChange("url", "${SHOP_URL}", "${OTHER_URL}"),
        FieldChange("statement_timeout", 300.0, 60.0),
    )
    assert items["local"].changes == (FieldChange("path", "out.ndjson", "b.ndjson"),)


def test_archive_all_refusal_is_lifted_by_its_flag() -> None:
    current = _catalog(_state("a"), _state("b", QUERY_B))
    (refusal,) = compute_plan(current, _config()).refusals
    assert "archive every active audience (a, b)" in refusal
    assert "--allow-archive-all" in refusal
    assert not compute_plan(current, _config(), allow_archive_all=True).is_refused


def test_rename_refusal_names_the_line_to_add_and_is_lifted_per_key() -> None:
    current = _catalog(_state("a"), _state("b", QUERY_B))
    desired = _config(_spec("a"), _spec("b2", QUERY_B, name="B Renamed"))
    (refusal,) = compute_plan(current, desired).refusals
    assert "add the line `key: b` to the audience 'B Renamed'" in refusal
    assert "--allow-new-key b2" in refusal
    assert not compute_plan(current, desired, allowed_new_keys={"b2"}).is_refused
    refusals = compute_plan(current, desired, allowed_new_keys={"other"}).refusals
    assert len(refusals) == 2
    assert refusals[0] == (
        "--allow-new-key other: this file creates no audience with that key (it creates: b2)"
    )


def test_a_rename_of_the_only_audience_is_refused_twice() -> None:
    current = _catalog(_state("a"))
    desired = _config(_spec("a2"))
    refusals = compute_plan(current, desired).refusals
    assert len(refusals) == 2
    assert not compute_plan(
        current, desired, allow_archive_all=True, allowed_new_keys={"a2"}
    ).is_refused


def test_the_report_counts_a_revival_as_an_update() -> None:
    current = _catalog(_state("a", is_archived=True), _state("b", QUERY_B), _state("d", "select 2"))
    plan = compute_plan(current, _config(_spec("a"), _spec("b", QUERY_B), _spec("c", "select 1")))
    report = plan.report()
    assert not plan.is_refused
    assert (report.created, report.updated, report.archived, report.unchanged) == (
        ["c"],
        ["a"],
        ["d"],
        ["b"],
    )


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("select 1", "select 1", True),
        ("select  1\n", "select 1", True),
        ("select 1", "select 2", False),
        ("select 'a b'", "select 'a  b'", True),  # spacing is compared loosely, by design
    ],
)
def test_same_query(a: str, b: str, same: bool) -> None:
    assert same_query(a, b) is same


@pytest.mark.parametrize(
    ("output", "workspace", "changes"),
    [
        (PairSpec("local"), DEFAULT_SPACE_ID, ()),
        (
            PairSpec("local", SendAs.TRACK),
            DEFAULT_SPACE_ID,
            (FieldChange("destinations", ("local",), ("local (send_as: track)",)),),
        ),
        (
            PairSpec("local", ortto_audience_name="VIPs"),
            DEFAULT_SPACE_ID,
            (FieldChange("destinations", ("local",), ("local (ortto_audience_name: VIPs)",)),),
        ),
        (
            PairSpec("local"),
            "spa_eu",
            (FieldChange("space_id", DEFAULT_SPACE_ID, "spa_eu"),),
        ),
    ],
)
def test_how_an_audience_is_sent_shows_as_a_change(
    output: PairSpec, workspace: str, changes: tuple[FieldChange, ...]
) -> None:
    desired = replace(_config(_spec("a", outputs=(output,))), space_id=workspace)
    [item] = [i for i in compute_plan(_catalog(_state("a")), desired).items if i.kind == "audience"]
    assert item.changes == changes
    assert item.action == (Action.CHANGE if changes else Action.UNCHANGED)
