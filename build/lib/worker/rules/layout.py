"""An event source's tables in the Segment warehouse layout, reflected once, and name checks.

Segment and RudderStack write `tracks` (every event), one table per event named by
snake_casing the event name (`Order Completed` -> `order_completed`) whose columns are the
event's properties, snake_cased too, `identifies` (anonymous id to user id, with traits) and
`users` (the latest traits per user). Rules name events and properties as sent; this module
turns those names into the reflected tables and columns, or refuses them naming what exists.

Indexes the compiled queries use: on each event table `(timestamp)` (a rule's window), on
`identifies` `(anonymous_id, timestamp)` (the user of each anonymous event), on `users` `(id)`
(its primary key). `tracks` is read in full, and only when anonymous members are included.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import inflection
from sqlalchemy import Column, Engine, MetaData, Table, column, func, select, table, types
from sqlalchemy.exc import SQLAlchemyError

from worker.errors import ConfigError, SourceError
from worker.rules.grammar import PRESENCE, TEXT_MATCHES, Condition, Scalar

# Columns every event table has (besides its properties), as Segment writes them.
EVENT_COLUMNS = ("user_id", "anonymous_id", "timestamp")
LAYOUTS = ("segment",)
_SPEC_KEYS = ("layout", "schema", "tracks", "identifies", "users")


class ValueKind(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    BOOLEAN = "boolean"
    TIME = "time"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class LayoutSpec:
    """What a source's `layout:` settings say: the schema and the names of the shared tables."""

    layout: str = "segment"
    schema: str | None = None
    tracks: str = "tracks"
    identifies: str = "identifies"
    users: str = "users"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"unknown layout {self.layout!r}; valid layouts: {', '.join(LAYOUTS)}"
            )


@dataclass(frozen=True, slots=True)
class Layout:
    """The reflected tables of one source; every identifier a rule compiles to comes from here."""

    spec: LayoutSpec
    dialect: str
    tables: dict[str, Table] = field(hash=False)

    @property
    def users(self) -> Table:
        return self._table(self.spec.users, "users", ("id",))

    @property
    def identifies(self) -> Table:
        return self._table(self.spec.identifies, "identifies", ("anonymous_id", "user_id"))

    @property
    def tracks(self) -> Table:
        return self._table(self.spec.tracks, "tracks", EVENT_COLUMNS)

    def event_table(self, event: str) -> Table:
        """The per-event table of `event` (as sent, e.g. `Order Completed`)."""
        name = table_name_of_event(event)
        table = self.tables.get(name)
        if table is None:
            shared = {self.spec.tracks, self.spec.identifies, self.spec.users}
            events = sorted(n for n in self.tables if n not in shared)
            raise ConfigError(
                f"event {event!r}: no table {name!r}{self._in_schema()}; event tables: "
                f"{', '.join(events) or '(none)'}"
            )
        self._require(table, EVENT_COLUMNS, f"event {event!r}")
        return table

    def column(self, table: Table, key: str, *, what: str) -> Column[object]:
        """The column of `table` for a property or trait named `key` as sent."""
        name = column_name_of_property(key)
        if name not in table.c:
            raise ConfigError(
                f"{what}: no column {name!r} in table {table.name!r}; columns: "
                f"{', '.join(sorted(table.c.keys()))}"
            )
        return table.c[name]

    def _table(self, name: str, role: str, needed: tuple[str, ...]) -> Table:
        table = self.tables.get(name)
        if table is None:
            raise ConfigError(
                f"the {role} table {name!r} does not exist{self._in_schema()}; tables: "
                f"{', '.join(sorted(self.tables)) or '(none)'} (set `{role}:` on the source "
                "to name another table)"
            )
        self._require(table, needed, f"the {role} table {name!r}")
        return table

    def _require(self, table: Table, needed: tuple[str, ...], what: str) -> None:
        missing = [c for c in needed if c not in table.c]
        if missing:
            raise ConfigError(f"{what} has no column {', '.join(missing)}")

    def _in_schema(self) -> str:
        return f" in schema {self.spec.schema!r}" if self.spec.schema else ""


def parse_layout_spec(data: object, *, at: str = "source") -> LayoutSpec:
    """A source's layout settings (`layout`, `schema`, `tracks`, `identifies`, `users`) from
    its configuration mapping; other keys of the mapping (url, ...) are not looked at."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{at}: expected a mapping with `layout: segment`")
    settings = {key: data[key] for key in _SPEC_KEYS if key in data}
    if "layout" not in settings:
        raise ConfigError(
            f"{at}: rule audiences need a source with a layout; valid layouts: {', '.join(LAYOUTS)}"
        )
    for key, value in settings.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{at}.{key}: expected a name, got {value!r}")
    return LayoutSpec(**{key: str(value).strip() for key, value in settings.items()})


def table_name_of_event(event: str) -> str:
    """Segment's table name for an event: `Order Completed` -> `order_completed`."""
    return _snake(event)


def column_name_of_property(key: str) -> str:
    """Segment's column name for a property: `orderId` -> `order_id`, `Plan Name` -> `plan_name`."""
    return _snake(key)


def _snake(name: str) -> str:
    underscored: str = inflection.underscore(name.strip())
    return re.sub(r"[^a-z0-9]+", "_", underscored.lower()).strip("_")


def reflect_layout(engine: Engine, spec: LayoutSpec) -> Layout:
    """Reflect the source's tables (names and columns) once; SourceError if that fails."""
    metadata = MetaData()
    try:
        if engine.dialect.name == "duckdb":
            _reflect_duckdb(engine, metadata, spec.schema)
        else:
            metadata.reflect(bind=engine, schema=spec.schema, resolve_fks=False)
    except SQLAlchemyError as exc:
        raise SourceError(f"cannot read the tables of the source: {exc}") from None
    tables = {table.name: table for table in metadata.tables.values()}
    layout = Layout(spec, engine.dialect.name, tables)
    layout.users  # noqa: B018 (fail at reflection time when the users table is missing)
    layout.identifies  # noqa: B018
    return layout


_DUCKDB_TYPES: tuple[tuple[str, type[types.TypeEngine[Any]]], ...] = (
    ("BOOL", types.Boolean),
    ("TIMESTAMP WITH TIME ZONE", types.DateTime),
    ("TIMESTAMP", types.DateTime),
    ("DATE", types.Date),
    ("TIME", types.Time),
    ("DOUBLE", types.Float),
    ("FLOAT", types.Float),
    ("REAL", types.Float),
    ("DECIMAL", types.Numeric),
    ("NUMERIC", types.Numeric),
    ("VARCHAR", types.String),
    ("TEXT", types.String),
    ("STRING", types.String),
    ("UUID", types.String),
)


def _reflect_duckdb(engine: Engine, metadata: MetaData, schema: str | None) -> None:
    """Tables and columns from information_schema: the DuckDB dialect's own reflection reads
    PostgreSQL catalogs DuckDB does not have."""
    columns = table("columns", column("table_schema"), column("table_name"), column("column_name"))
    columns.append_column(column("data_type"))
    columns.append_column(column("ordinal_position"))
    columns.schema = "information_schema"
    wanted = columns.c.table_schema == (schema if schema else func.current_schema())
    query = (
        select(columns.c.table_name, columns.c.column_name, columns.c.data_type)
        .where(wanted)
        .order_by(columns.c.table_name, columns.c.ordinal_position)
    )
    found: dict[str, list[Column[Any]]] = {}
    with engine.connect() as connection:
        for table_name, column_name, data_type in connection.execute(query):
            found.setdefault(table_name, []).append(Column(column_name, _duckdb_type(data_type)))
    for table_name, table_columns in found.items():
        Table(table_name, metadata, *table_columns, schema=schema)


def _duckdb_type(data_type: str) -> types.TypeEngine[Any]:
    name = data_type.upper()
    if name.endswith("INT") or name in ("INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT"):
        return types.Integer()
    for prefix, type_class in _DUCKDB_TYPES:
        if name.startswith(prefix):
            if type_class is types.DateTime:
                return types.DateTime(timezone="TIME ZONE" in name)
            return type_class()
    return types.NullType()


def kind_of(column: Column[object]) -> ValueKind:
    """What values a column holds, as far as comparisons in rules are concerned."""
    column_type = column.type
    if isinstance(column_type, types.Boolean):
        return ValueKind.BOOLEAN
    if isinstance(column_type, types.Integer | types.Numeric | types.Float):
        return ValueKind.NUMBER
    if isinstance(column_type, types.String):
        return ValueKind.TEXT
    if isinstance(column_type, types.DateTime | types.Date | types.Time):
        return ValueKind.TIME
    return ValueKind.OTHER


def check_condition(column: Column[object], condition: Condition, *, what: str) -> None:
    """Refuse a condition whose values cannot be compared with the column's values."""
    if condition.operator in PRESENCE:
        return
    kind = kind_of(column)
    column_text = f"{what}: column {column.name!r} holds {kind.value}"
    if condition.operator in TEXT_MATCHES and kind not in (ValueKind.TEXT, ValueKind.OTHER):
        raise ConfigError(f"{column_text}; `{condition.operator}` works on text columns only")
    if kind is ValueKind.TIME:
        raise ConfigError(
            f"{column_text}; compare event times with `within` or `between`, or test the column "
            "with exists / not_exists"
        )
    value = condition.value
    values: tuple[Scalar, ...] = (
        value if isinstance(value, tuple) else (() if value is None else (value,))
    )
    for value in values:
        if not _fits(kind, value):
            raise ConfigError(
                f"{column_text} but {condition.key}.{condition.operator} compares it with "
                f"{_kind_of_value(value)} {value!r}"
            )


def _fits(kind: ValueKind, value: Scalar) -> bool:
    if kind is ValueKind.TEXT:
        return isinstance(value, str)
    if kind is ValueKind.NUMBER:  # MySQL keeps booleans in integer columns
        return isinstance(value, int | float)
    if kind is ValueKind.BOOLEAN:
        return isinstance(value, bool)
    return True


def _kind_of_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true/false"
    return "text" if isinstance(value, str) else "a number"
