"""Audience key naming."""

import pytest

from worker.errors import ConfigError
from worker.keys import audience_key, validate_pinned_key


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("High-Value Customers", "high_value_customers"),
        ("VIP (EU) users!", "vip_eu_users"),
        ("orderCompletedLast30Days", "order_completed_last30_days"),
        ("already_snake_case", "already_snake_case"),
        ("  padded   name  ", "padded_name"),
        ("Café Regulars", "cafe_regulars"),
        ("HTTPServer Users", "http_server_users"),
        ("2024 buyers", "2024_buyers"),
        ("a--b__c", "a_b_c"),
        ("CamelCase", "camel_case"),
    ],
)
def test_audience_key(name: str, key: str) -> None:
    assert audience_key(name) == key


@pytest.mark.parametrize("name", ["", "!!!", "   ", "---", "()", "日本のユーザー", "Ελληνικά"])
def test_name_without_latin_letters_or_digits_asks_for_a_key(name: str) -> None:
    with pytest.raises(ConfigError, match=r"no letters or digits .*Latin.*pin one with `key:`"):
        audience_key(name)


@pytest.mark.parametrize("key", ["vip", "order_30days", "a1_b2"])
def test_pinned_key_accepted(key: str) -> None:
    assert validate_pinned_key(key) == key


@pytest.mark.parametrize("key", ["VIP", "two  words", "_leading", "trailing_", "dou__ble", "a-b"])
def test_pinned_key_must_be_snake_case(key: str) -> None:
    with pytest.raises(ConfigError, match="not snake_case"):
        validate_pinned_key(key)
