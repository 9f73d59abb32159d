"""The audiences file's Engage outputs: the `workspace:` block, a destination entry's
`send_as` and `ortto_audience_name`. What `apply` stores, and bad input: one line naming the
file and the line, exit status 2, nothing changed (through the CLI, on both backends)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from worker.config import PairSpec, load_config
from worker.errors import ConfigError
from worker.payloads import DEFAULT_SPACE_ID, SendAs
from worker.testing.databases import ShopSource
from worker.testing.guarantees import ORTTO_KEY_VARIABLE, dump_database, error_lines, invoke

ORTTO_KEY = "pau-engage-config-key-000000000"
GOOD = """\
workspace:
  space_id: spa_o1E9shop
sources:
  shop:
    url: "{source_url}"
destinations:
  local: {{type: file, path: "{out}"}}
  ortto: {{type: ortto, api_key: "${{ORTTO_API_KEY}}", endpoint: "http://127.0.0.1:9"}}
  rest: {{type: ortto-api, api_key: "${{ORTTO_API_KEY}}", endpoint: "http://127.0.0.1:9"}}
  native: {{type: ortto-audiences, api_key: "${{ORTTO_API_KEY}}", endpoint: "http://127.0.0.1:9"}}
  segment:
    type: segment
    write_key: "${{ORTTO_API_KEY}}"
    region: eu
audiences:
  - name: High Value
    source: shop
    query: select user_id, email from people where a = 1
    destinations:
      - local
      - {{name: ortto, send_as: both}}
      - rest
      - {{name: native, ortto_audience_name: VIP journeys}}
      - name: segment
        send_as: track
"""


@dataclass(frozen=True)
class Case:
    name: str
    old: str
    new: str
    expected: str  # in the error line
    marker: str  # the line the error must name holds this


CASES = [
    Case(
        "send_as other than the three",
        "send_as: track",
        "send_as: email",
        "send_as: must be one of identify, track, both (got 'email')",
        "send_as: email",
    ),
    Case(
        "track on ortto-api",
        "      - rest\n",
        "      - {name: rest, send_as: track}\n",
        "destination 'rest' is of type ortto-api, which takes no track events",
        "name: rest",
    ),
    Case(
        "both on ortto-api",
        "      - rest\n",
        "      - {name: rest, send_as: both}\n",
        "which takes no track events",
        "name: rest",
    ),
    Case(
        "track on ortto-audiences",
        "{name: native, ortto_audience_name: VIP journeys}",
        "{name: native, send_as: track}",
        "destination 'native' is of type ortto-audiences, which takes no track events",
        "name: native",
    ),
    Case(
        "ortto_audience_name on another type",
        "{name: ortto, send_as: both}",
        "{name: ortto, ortto_audience_name: VIPs}",
        "only an ortto-audiences destination keeps a native Ortto audience",
        "name: ortto,",
    ),
    Case(
        "a blank ortto_audience_name",
        "ortto_audience_name: VIP journeys",
        "ortto_audience_name: '  '",
        "ortto_audience_name: is blank",
        "ortto_audience_name: '  '",
    ),
    Case(
        "an unknown key in a destination entry",
        "send_as: track",
        "sendas: track",
        "unknown key 'sendas'",
        "sendas: track",
    ),
    Case(
        "region other than us and eu",
        "region: eu",
        "region: mars",
        "region",
        "region: mars",
    ),
    Case(
        "a blank space_id",
        "space_id: spa_o1E9shop",
        "space_id: '   '",
        "workspace.space_id is blank",
        "space_id: '   '",
    ),
    Case(
        "an empty space_id",
        "space_id: spa_o1E9shop",
        "space_id: ''",
        "workspace.space_id is blank",
        "space_id: ''",
    ),
]


def _good(tmp_path: Path, shop: ShopSource) -> str:
    return GOOD.format(source_url=shop.url, out=tmp_path / "identify.ndjson")


def test_the_file_reads_send_as_names_and_the_space_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ORTTO_KEY_VARIABLE, ORTTO_KEY)
    path = tmp_path / "audiences.yml"
    path.write_text(GOOD.format(source_url="sqlite:///shop.db", out="out.ndjson"))
    config = load_config(path)
    assert config.space_id == "spa_o1E9shop"
    [audience] = config.audiences
    assert audience.destinations == ("local", "ortto", "rest", "native", "segment")
    assert audience.outputs == (
        PairSpec("local"),
        PairSpec("ortto", SendAs.BOTH),
        PairSpec("rest"),
        PairSpec("native", SendAs.IDENTIFY, "VIP journeys"),
        PairSpec("segment", SendAs.TRACK),
    )
    path.write_text(path.read_text().split("sources:", 1)[1].join(["sources:", ""]))
    assert load_config(path).space_id == DEFAULT_SPACE_ID  # no workspace block


def test_a_destination_listed_twice_in_either_form_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ORTTO_KEY_VARIABLE, ORTTO_KEY)
    path = tmp_path / "audiences.yml"
    text_ = GOOD.format(source_url="sqlite:///shop.db", out="out.ndjson")
    path.write_text(text_.replace("      - rest\n", "      - {name: local, send_as: track}\n"))
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(path)


@pytest.fixture
def cli_state(cli: None, state_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ORTTO_KEY_VARIABLE, ORTTO_KEY)
    return state_url


def _stored(state_url: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    engine = create_engine(state_url)
    try:
        with engine.connect() as connection:
            pairs = connection.execute(
                text(
                    "select d.name, p.send_as, p.ortto_audience_name from audience_destinations p "
                    "join destinations d on d.id = p.destination_id order by d.name"
                )
            ).all()
            spaces = connection.scalars(text("select space_id from audiences")).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in pairs], list(spaces)  # type: ignore[misc]


def test_apply_stores_send_as_names_and_space_id_and_bad_input_changes_nothing(
    cli_state: str,
    shop: ShopSource,
    tmp_path: Path,
    subtests: pytest.Subtests,
) -> None:
    good = _good(tmp_path, shop)
    path = tmp_path / "audiences.yml"
    path.write_text(good)
    assert invoke("apply", str(path)).exit_code == 0
    pairs, spaces = _stored(cli_state)
    assert pairs == [
        ("local", "identify", None),
        ("native", "identify", "VIP journeys"),
        ("ortto", "both", None),
        ("rest", "identify", None),
        ("segment", "track", None),
    ]
    assert spaces == ["spa_o1E9shop"]
    before = dump_database(cli_state)

    for case in CASES:
        with subtests.test(case.name):
            assert case.old in good
            bad = good.replace(case.old, case.new, 1)
            path.write_text(bad)
            result = invoke("apply", str(path))
            assert result.exit_code == 2, result.output
            [line] = error_lines(result)
            assert line.startswith(f"error: {path}"), line
            assert case.expected in line, line
            number = next(i for i, row in enumerate(bad.splitlines(), 1) if case.marker in row)
            assert f"(line {number})" in line, line
            assert dump_database(cli_state) == before

    # Back to the defaults: no workspace block, plain names.
    path.write_text(
        good.split("sources:", 1)[1]
        .join(["sources:", ""])
        .replace("{name: ortto, send_as: both}", "ortto")
    )
    assert invoke("apply", str(path)).exit_code == 0
    pairs, spaces = _stored(cli_state)
    assert ("ortto", "identify", None) in pairs
    assert spaces == [DEFAULT_SPACE_ID]
