"""Guarantee 8: bad configuration changes nothing. Guarantee 6, first half: a query of more
than one statement is refused at `apply`.

Each bad file goes through `audience-sync apply` (the CLI in this process): one line of
error naming the problem (and the line, where the file has one), exit status 2, and a
state database whose every row is what it was before.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.testing.databases import ShopSource
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    dump_database,
    error_lines,
    invoke,
)

GOOD = """\
sources:
  shop:
    url: "{source_url}"
    statement_timeout: 30
destinations:
  local: {{type: file, path: "{out}"}}
  ortto:
    type: ortto
    api_key: "${{ORTTO_API_KEY}}"
    endpoint: http://127.0.0.1:9
    rate_limit: 10/s
audiences:
  - name: High Value
    source: shop
    query: select user_id, email from people where a = 1
    destinations: [local, ortto]
"""
GOOD_KEY = "pau-config-test-key-0000000000"


@dataclass(frozen=True)
class Case:
    name: str
    edit: Callable[[str], str]
    expected: str  # in the error line
    line: int | None = None  # the line the error must name
    env: tuple[tuple[str, str], ...] = ()


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text
        return text.replace(old, new, 1)

    return edit


def _append(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


CASES = [
    Case("malformed YAML", _replace("[local, ortto]", "[local, ortto"), "malformed YAML"),
    Case("not a mapping", lambda _: "- just\n- a list\n", "top level must be a mapping"),
    Case("unknown top-level key", _append("extras: 1\n"), "unknown key 'extras'", 17),
    Case(
        "unknown key in a source",
        _replace("    statement_timeout: 30\n", "    statement_timeout: 30\n    passwd: x\n"),
        "unknown key 'sources.shop.passwd'",
        5,
    ),
    Case(
        "unknown key in an audience",
        _append("    colour: red\n"),
        "unknown key 'audiences.0.colour'",
        17,
    ),
    Case(
        "unknown key in a destination",
        _replace("    endpoint: http", "    endpont: http"),
        "unknown key 'endpont'",
        10,
    ),
    Case(
        "missing environment variable",
        _replace("${ORTTO_API_KEY}", "${NOT_SET_ANYWHERE_KEY}"),
        "environment variable NOT_SET_ANYWHERE_KEY is not set",
    ),
    Case(
        "key collision",
        _append(
            "  - name: high-value\n    source: shop\n    query: select user_id from people\n"
            "    destinations: [local]\n"
        ),
        "both have the key 'high_value'",
    ),
    Case(
        "unknown destination type",
        _replace("type: file", "type: mailchimp"),
        "unknown destination type 'mailchimp'",
        6,
    ),
    Case(
        "malformed Ortto key",
        lambda text: text,
        "the Ortto API key is malformed",
        9,
        env=((ORTTO_KEY_VARIABLE, "bogus-key-value"),),
    ),
    Case(
        "rate_limit that does not parse",
        _replace("rate_limit: 10/s", "rate_limit: fast"),
        "destinations.ortto (line 11): rate_limit 'fast' does not parse",
    ),
    Case(
        "secret written in the file",
        _replace('"${ORTTO_API_KEY}"', "pau-written-in-the-file"),
        "write it as an environment reference",
        9,
    ),
    Case(
        "unknown destination reference",
        _replace("[local, ortto]", "[local, nowhere]"),
        "unknown destination 'nowhere'",
    ),
    Case(
        "unknown source reference",
        _replace("    source: shop\n", "    source: warehouse\n"),
        "unknown source 'warehouse'",
    ),
    Case(
        "name too long for the state database",
        _replace("  shop:\n", "  " + "s" * 101 + ":\n"),
        "at most 100 characters",
        2,
    ),
    Case(
        "two statements",
        _replace("where a = 1\n", "where a = 1; delete from people\n"),
        "holds 2 statements",
    ),
    Case(
        "a broken query",
        _replace("where a = 1", "where no_such_column = 1"),
        "audience 'high_value': source shop",
    ),
    Case("bad schedule", _append("    schedule: every fortnight\n"), "schedule"),
]


@pytest.fixture
def cli_state(cli: None, state_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The command line on the test's state database, with a good Ortto key."""
    monkeypatch.setenv(ORTTO_KEY_VARIABLE, GOOD_KEY)
    return state_url


def _good(tmp_path: Path, shop: ShopSource) -> str:
    return GOOD.format(source_url=shop.url, out=tmp_path / "identify.ndjson")


def test_bad_configuration_changes_nothing(
    cli_state: str,
    shop: ShopSource,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    subtests: pytest.Subtests,
) -> None:
    shop.add([("u1", "u1@example.com", 1, 0, 0), ("u2", None, 0, 0, 0)])
    good = _good(tmp_path, shop)
    path = tmp_path / "audiences.yml"
    path.write_text(good)
    assert invoke("apply", str(path)).exit_code == 0
    assert invoke("sync", "high_value", "--destination", "local").exit_code == 0
    before = dump_database(cli_state)
    assert before["sync_runs"] and before["synced_members"]

    for case in CASES:
        with subtests.test(case.name), monkeypatch.context() as patch:
            for name, value in case.env:
                patch.setenv(name, value)
            text = case.edit(good)
            path.write_text(text)
            result = invoke("apply", str(path))
            assert result.exit_code == 2, result.output
            [line] = error_lines(result)
            assert line.startswith("error: ") and case.expected in line, line
            if case.line is not None:
                assert f"(line {case.line})" in line, (line, text.splitlines()[case.line - 1])
            for _, value in case.env:
                assert value not in line
            assert dump_database(cli_state) == before
    assert shop.members("a") == {"u1"}  # the two-statement query deleted nobody


@pytest.mark.parametrize(
    "query",
    [
        "select user_id from people where a = 1;",
        "select user_id from people where a = 1 -- members only",
        "select user_id from people where a = 1; -- members only",
        "select user_id from people /* ; */ where a = 1",
        "select user_id from people where email <> 'a;b' and a = 1",
        "-- the VIPs\nselect user_id from people where a = 1",
    ],
)
def test_one_statement_with_comments_and_semicolons_is_accepted(
    cli_state: str, shop: ShopSource, tmp_path: Path, query: str
) -> None:
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 0, 0, 0)])
    good = _good(tmp_path, shop).replace(
        "query: select user_id, email from people where a = 1", f"query: {json.dumps(query)}"
    )
    path = tmp_path / "audiences.yml"
    path.write_text(good.replace("[local, ortto]", "[local]"))
    result = invoke("apply", str(path))
    assert result.exit_code == 0, result.output
    synced = invoke("sync", "high_value")
    assert synced.exit_code == 0, synced.output
    assert "succeeded" in synced.stdout
