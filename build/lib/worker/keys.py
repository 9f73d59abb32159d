"""Audience key naming: the snake_cased audience name that becomes the trait name."""

import re

import inflection

from worker.errors import ConfigError

_NON_WORD = re.compile(r"[^a-z0-9]+")
KEY_PATTERN = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


def audience_key(name: str) -> str:
    """Snake-case an audience name: "Order Completed Last 30days" -> order_completed_last_30days.

    camelCase is split the way inflection does it ("orderCompletedLast30Days" ->
    order_completed_last30_days); accents are transliterated; every run of other
    characters becomes one underscore.
    """
    ascii_name = inflection.transliterate(name)
    key = _NON_WORD.sub("_", inflection.underscore(ascii_name).lower()).strip("_")
    if not key:
        # Transliteration knows Latin accents only: 日本のユーザー leaves nothing to keep.
        raise ConfigError(
            f"audience name {name!r} has no letters or digits to make a key from (a key is "
            "Latin letters, digits and underscores): pin one with `key:` on the audience, "
            "e.g. `key: japan_users`"
        )
    return key


def validate_pinned_key(key: str) -> str:
    """A key given by hand must already be in snake_case form."""
    if not KEY_PATTERN.match(key) or len(key) > 200:
        raise ConfigError(
            f"audience key {key!r} is not snake_case (lowercase letters, digits and single "
            "underscores, at most 200 characters)"
        )
    return key
