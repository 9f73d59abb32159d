"""Tests of the one settings path: resolving templates into typed settings, the type registry,
and the pool that builds each client once."""

from typing import Any

import pytest
from pydantic import SecretStr

from tests.destinations.common import FAST
from worker.destinations.file import FileDestination, FileSettings
from worker.destinations.http_client import HttpDestinationClient
from worker.destinations.ortto import OrttoDestination, OrttoSettings
from worker.destinations.registry import (
    DESTINATION_TYPES,
    DestinationSettingsError,
    build_client,
    resolve_settings,
)
from worker.destinations.settings import HttpDestinationSettings
from worker.errors import ConfigError
from worker.pool import DestinationPool
from worker.ratelimit import LocalRateLimiter, RateLimit, RateLimiter, account_id

KEY = "pau-registry-test-key-0123456789"
ENV = {"ORTTO_KEY": KEY}
ORTTO = {"type": "ortto", "api_key": "${ORTTO_KEY}", "endpoint": "http://127.0.0.1:9"}


def test_every_type_maps_settings_to_a_client() -> None:
    assert list(DESTINATION_TYPES) == ["file", "ortto", "ortto-api", "ortto-audiences", "segment"]
    for kind in DESTINATION_TYPES.values():
        is_http = issubclass(kind.settings, HttpDestinationSettings)
        assert is_http == issubclass(kind.client, HttpDestinationClient)  # type: ignore[arg-type]
    assert DESTINATION_TYPES["file"].settings.secret_fields() == frozenset()
    assert DESTINATION_TYPES["ortto"].settings.secret_fields() == {"api_key"}
    assert DESTINATION_TYPES["segment"].settings.secret_fields() == {"write_key"}
    assert DESTINATION_TYPES["ortto-audiences"].settings.secret_fields() == {"api_key"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (ORTTO, OrttoSettings(api_key=SecretStr(KEY), endpoint="http://127.0.0.1:9")),
        (
            {**ORTTO, "rate_limit": "600/m"},
            OrttoSettings(api_key=KEY, endpoint="http://127.0.0.1:9", rate_limit=RateLimit(10)),
        ),
        ({"type": "file", "path": "${ORTTO_KEY}.ndjson"}, FileSettings(path=f"{KEY}.ndjson")),
    ],
)
def test_resolve_settings(template: dict[str, Any], expected: Any) -> None:
    assert resolve_settings("d", template, ENV) == expected


def test_the_rate_limit_is_held_parsed() -> None:
    settings = resolve_settings("d", {**ORTTO, "rate_limit": "20/s"}, ENV)
    assert isinstance(settings, OrttoSettings)
    assert settings.rate_limit == RateLimit(20)
    assert resolve_settings("d", ORTTO, ENV).rate_limit == RateLimit(10)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("template", "loc", "message"),
    [
        ({"type": "pigeon"}, ("type",), "destinations.d: unknown destination type 'pigeon'; use"),
        ({"path": "x"}, ("type",), "destinations.d: unknown destination type None"),
        ({**ORTTO, "api_key": KEY}, ("api_key",), "destinations.d.api_key: write it as an env"),
        ({**ORTTO, "rate_limit": "fast"}, ("rate_limit",), "destinations.d: rate_limit 'fast'"),
        ({**ORTTO, "rate": "1/s"}, ("rate",), "destinations.d: unknown key 'rate'"),
        ({"type": "file"}, ("path",), "destinations.d: path: Field required"),
        ({**ORTTO, "api_key": "${BAD_KEY}"}, ("api_key",), "destinations.d: api_key: the Ortto"),
    ],
)
def test_resolve_settings_names_the_problem(
    template: dict[str, Any], loc: tuple[str, ...], message: str
) -> None:
    with pytest.raises(DestinationSettingsError) as caught:
        resolve_settings("d", template, {**ENV, "BAD_KEY": "bogus-key-value"})
    assert caught.value.loc == loc
    assert str(caught.value).startswith(message), str(caught.value)
    assert "bogus-key-value" not in str(caught.value)


def test_a_missing_variable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="environment variable ORTTO_KEY is not set"):
        resolve_settings("d", ORTTO, {})


def test_build_client_refuses_unregistered_settings() -> None:
    with pytest.raises(TypeError, match="not the settings of a destination type"):
        build_client("d", HttpDestinationSettings(rate_limit="1/s"), http=FAST, limiter=None)


def test_the_pool_builds_each_client_once_with_the_parsed_rate_limit() -> None:
    asked: list[tuple[str, RateLimit]] = []

    def limiter_factory(name: str, limit: RateLimit) -> RateLimiter:
        asked.append((name, limit))
        return LocalRateLimiter(limit)

    env = dict(ENV)
    pool = DestinationPool(http=FAST, limiter_factory=limiter_factory, env=env)
    template = {**ORTTO, "rate_limit": "5/s"}
    client = pool.get("o", template)
    env.clear()  # resolved once: later pages need the variables no more
    assert pool.get("o", dict(template)) is client
    assert isinstance(client, OrttoDestination)
    file = pool.get("f", {"type": "file", "path": "out.ndjson"})
    assert isinstance(file, FileDestination)
    assert asked == [("destination:o", RateLimit(5))]  # a file is not paced
    pool.close()


def test_destinations_on_one_ortto_account_share_one_rate_bucket() -> None:
    # Ortto counts requests per account: two destinations on one API key get one limit
    # between them, not one each; another key is another account.
    asked: list[tuple[str, RateLimit]] = []

    def limiter_factory(bucket: str, limit: RateLimit) -> RateLimiter:
        asked.append((bucket, limit))
        return LocalRateLimiter(limit)

    env = {"ONE_KEY": KEY, "OTHER_KEY": "pau-another-account-key-01234567"}
    pool = DestinationPool(http=FAST, limiter_factory=limiter_factory, env=env)
    api = {"type": "ortto-api", "endpoint": "http://127.0.0.1:9"}
    pool.get("crm", {**api, "api_key": "${ONE_KEY}"})
    pool.get("crm_copy", {**api, "api_key": "${ONE_KEY}"})
    pool.get("other_crm", {**api, "api_key": "${OTHER_KEY}"})
    pool.close()
    buckets = [bucket for bucket, _limit in asked]
    assert buckets[0] == buckets[1] == f"account:{account_id(KEY)}"
    assert buckets[2] == f"account:{account_id(env['OTHER_KEY'])}"
    assert KEY not in "".join(buckets)  # the bucket names the account, never its key
