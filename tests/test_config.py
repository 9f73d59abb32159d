"""Loading audiences files, and applying them to the state database."""

from pathlib import Path

import pytest
from sqlalchemy import select

from models import Audience, AudienceDestination, Destination
from worker.config import load_config
from worker.errors import ConfigError
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config

VALID = """\
sources:
  shop: {url: "${SHOP_URL}", statement_timeout: 30}
destinations:
  ortto: {type: ortto, api_key: "${ORTTO_KEY}", endpoint: "http://127.0.0.1:9000"}
  local: {type: file, path: out/identify.ndjson}
audiences:
  - name: Order Completed Last 30days
    source: shop
    query: select id as user_id, email from users;
    schedule: every 2h
    destinations: [ortto, local]
  - name: VIP (EU) users!
    key: vips
    source: shop
    query: select id as user_id from users
    destinations: [local]
"""
ENV = {"SHOP_URL": "sqlite:///shop.db", "ORTTO_KEY": "pau-secret-value"}


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "audiences.yml"
    path.write_text(text)
    return load_config(path, ENV if env is None else env)


def test_valid_file(tmp_path: Path) -> None:
    config = _load(tmp_path, VALID)
    first, second = config.audiences  # type: ignore[attr-defined]
    assert (first.key, first.is_key_pinned, first.destinations) == (
        "order_completed_last_30days",
        False,
        ("ortto", "local"),
    )
    assert first.query == "select id as user_id, email from users"
    assert (second.key, second.is_key_pinned, second.schedule) == ("vips", True, "every 2h")
    # References are kept as written: secrets are resolved at run time, never stored.
    [source] = config.sources  # type: ignore[attr-defined]
    assert source.url == "${SHOP_URL}"
    ortto = next(d for d in config.destinations if d.name == "ortto")  # type: ignore[attr-defined]
    assert ortto.settings["api_key"] == "${ORTTO_KEY}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("schedule: every 2h", "schedule: whenever"), "schedule 'whenever' is not understood"),
        (
            ("schedule: every 2h", "scheduel: every 2h"),
            r"\(line 10\): unknown key 'audiences.0.scheduel'",
        ),
        (
            ("destinations: [ortto, local]", "destinations: [ortto, nowhere]"),
            "unknown destination 'nowhere'",
        ),
        (
            (
                "    source: shop\n    query: select id as user_id, email",
                "    source: warehouse\n    query: select id as user_id, email",
            ),
            "unknown source 'warehouse'",
        ),
        (
            ("key: vips", "key: order_completed_last_30days"),
            "both have the key 'order_completed_last_30days'",
        ),
        (("from users;", "from users; delete from users"), "holds 2 statements"),
        (("type: file", "type: carrier-pigeon"), "unknown destination type 'carrier-pigeon'"),
        (
            ('api_key: "${ORTTO_KEY}"', "api_key: pau-literal"),
            "write it as an environment reference",
        ),
        (("name: VIP (EU) users!", "name: '!!!'"), "no letters or digits"),
        (("shop: {", "shop: ["), "malformed YAML"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = VALID.replace(*change)
    assert text != VALID
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_missing_environment_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable ORTTO_KEY is not set"):
        _load(tmp_path, VALID, {"SHOP_URL": "sqlite:///shop.db"})


@pytest.mark.parametrize("key", ["pau", "pau_abc", "p1u-abc", "nonsense"])
def test_malformed_ortto_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="Ortto API key is malformed"):
        _load(tmp_path, VALID, {**ENV, "ORTTO_KEY": key})


def test_malformed_key_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, VALID, {**ENV, "ORTTO_KEY": "zzzz-very-secret"})
    assert "very-secret" not in str(caught.value)


def test_literal_password_in_source_url_is_refused(tmp_path: Path) -> None:
    text = VALID.replace('"${SHOP_URL}"', "postgresql://app:hunter2@db/shop")
    with pytest.raises(ConfigError, match="holds a password"):
        _load(tmp_path, text)


def test_apply_creates_updates_and_archives(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    first = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Big Spenders", "a", key="big_spenders"), audience("Churn Risk", "b")],
    )
    apply_file(runtime, first)
    # Rename the pinned audience, drop the other, add a new one.
    second = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Biggest Spenders", "a", key="big_spenders"), audience("New", "c")],
        name="second.yml",
    )
    apply_file(runtime, second)
    with runtime.sessions() as session:
        rows = {a.key: a for a in session.scalars(select(Audience))}
        assert rows["big_spenders"].name == "Biggest Spenders"
        assert rows["churn_risk"].is_archived
        assert not rows["new"].is_archived
    # Coming back resumes the same audience (same id, same key).
    archived_id = rows["churn_risk"].id
    apply_file(runtime, first)
    with runtime.sessions() as session:
        back = session.scalar(select(Audience).where(Audience.key == "churn_risk"))
        assert back is not None and back.id == archived_id and not back.is_archived


def test_apply_is_all_or_nothing(tmp_path: Path, shop: ShopSource, runtime: Runtime) -> None:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[
            audience("Fine", "a"),
            {**audience("Broken", "b"), "query": "select x from nope"},
        ],
    )
    with pytest.raises(ConfigError, match="audience 'broken'"):
        apply_file(runtime, path)
    with runtime.sessions() as session:
        assert session.scalars(select(Audience)).all() == []
        assert session.scalars(select(Destination)).all() == []


def test_destination_removed_from_audience_is_disabled(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    destinations = {
        "one": {"type": "file", "path": str(tmp_path / "one.ndjson")},
        "two": {"type": "file", "path": str(tmp_path / "two.ndjson")},
    }
    apply_file(
        runtime,
        write_config(
            tmp_path,
            source_url=shop.url,
            destinations=destinations,
            audiences=[audience("A", "a", ["one", "two"])],
        ),
    )
    apply_file(
        runtime,
        write_config(
            tmp_path,
            source_url=shop.url,
            destinations=destinations,
            audiences=[audience("A", "a", ["one"])],
        ),
    )
    with runtime.sessions() as session:
        enabled = {
            (link.destination.name, link.is_enabled)
            for link in session.scalars(select(AudienceDestination))
        }
    assert enabled == {("one", True), ("two", False)}
    assert runtime.service.select_pairs(audience_keys=["a"]) != []


SEGMENT = """\
sources:
  shop: {url: "${SHOP_URL}"}
destinations:
  segment:
    type: segment
    write_key: "${SEGMENT_KEY}"
    region: REGION
audiences:
  - name: VIPs
    source: shop
    query: select id as user_id from users
    destinations: [segment]
"""


@pytest.mark.parametrize("region", ["us", "eu"])
def test_segment_region_is_accepted(tmp_path: Path, region: str) -> None:
    config = _load(
        tmp_path, SEGMENT.replace("REGION", region), {**ENV, "SEGMENT_KEY": "write-key-0123"}
    )
    [segment] = config.destinations  # type: ignore[attr-defined]
    assert segment.settings["region"] == region


@pytest.mark.parametrize("region", ["EU", "eu1", "asia", "''"])
def test_a_bad_segment_region_names_the_file_and_line(tmp_path: Path, region: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, SEGMENT.replace("REGION", region), {**ENV, "SEGMENT_KEY": "k-0123"})
    path = tmp_path / "audiences.yml"
    assert str(caught.value) == (
        f"{path}: destinations.segment (line 7): region: Input should be 'us' or 'eu'"
    )
