"""PII masking rules: parsing, checking against a table's columns, and the masked converter.
Pure.

A rule names a Cassandra column as `keyspace.table.column` (a UDT field as
`keyspace.table.column.field`) and a method: `hash`, `redact`, `null`, `partial:first:N` or
`partial:last:N`. README "PII masking" says what each method writes and which types it fits;
MaskingPolicy.masks refuses a rule that does not fit. `hash` digests a value that is not text in its
canonical text (model.scalars.TEXT_RENDERINGS), so its column is stored as text
(`ColumnMask.stored_type`). A mask composes with the column's converter (`ColumnMask.guarded` /
`ColumnMask.unguarded`): what leaves it is masked, and a conversion error of a masked column
shows the marker, never the value.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cdc_sink.config import ConfigError, MaskingConfig
from cdc_sink.model.cql import CqlType
from cdc_sink.model.scalars import InvalidValue, guard, nullable, text_rendering
from cdc_sink.model.values import unguarded_converter

Converter = Callable[[Any], Any]

METHODS = ("hash", "redact", "null", "partial")
DEFAULT_MARKER = "***"
_TEXT_TYPES = frozenset(("text", "ascii", "varchar"))
TEXT = CqlType("text")
_RULE = re.compile(r"(\w+)\.(\w+)\.(.+)")
_PARTIAL = re.compile(r"partial:(first|last):(\d+)")


class MaskingError(ConfigError):
    """A masking rule that cannot be parsed or does not fit its column; the message names it."""


@dataclass(frozen=True)
class MaskRule:
    """One rule: which source column, and how it is masked."""

    keyspace: str
    table: str
    column: str
    method: str  # one of METHODS
    keep: int = 0  # partial: how many characters are kept
    from_end: bool = False  # partial: keep the last `keep` characters instead of the first

    @property
    def text(self) -> str:
        """The rule as written in the settings."""
        method = self.method
        if method == "partial":
            method = f"partial:{'last' if self.from_end else 'first'}:{self.keep}"
        return f"{self.keyspace}.{self.table}.{self.column}={method}"


def parse_rules(text: str) -> tuple[MaskRule, ...]:
    """Rules from `keyspace.table.column=method` entries separated by `;` or new lines
    (blank entries and `#` comments are skipped). MaskingError names the first bad entry;
    a column named twice is refused."""
    rules: dict[tuple[str, str, str], MaskRule] = {}  # by where: in the order written
    for raw in re.split(r"[;\n]", text):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        rule = _parse_rule(entry)
        where = (rule.keyspace, rule.table, rule.column)
        if where in rules:
            raise MaskingError(f"masking rule {entry!r}: {'.'.join(where)} has a rule already")
        rules[where] = rule
    return tuple(rules.values())


def _parse_rule(entry: str) -> MaskRule:
    name, equals, method = (part.strip() for part in entry.partition("="))
    found = _RULE.fullmatch(name)
    if not equals or found is None:
        raise MaskingError(
            f"masking rule {entry!r} is not `keyspace.table.column=method` "
            f"(method: {', '.join(METHODS)})"
        )
    keyspace, table, column = found.groups()
    if method in ("hash", "redact", "null"):
        return MaskRule(keyspace, table, column, method)
    partial = _PARTIAL.fullmatch(method)
    if partial is None:
        raise MaskingError(
            f"masking rule {entry!r}: unknown method {method!r} (hash, redact, null, "
            "partial:first:N or partial:last:N)"
        )
    return MaskRule(keyspace, table, column, "partial", int(partial[2]), partial[1] == "last")


def hash_text(key: bytes, value: str) -> str:
    """HMAC-SHA-256 of the value's UTF-8 bytes under `key`, in hex."""
    return hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def is_text(t: CqlType) -> bool:
    """Whether values of `t` are text already (text, ascii, varchar, or a list or set of them)."""
    return t.name in _TEXT_TYPES or (t.name in ("list", "set") and t.params[0].name in _TEXT_TYPES)


def as_text(t: CqlType) -> CqlType:
    """The type whose column holds `t`'s values as text: text for a scalar, list<text> or
    set<text> (a `text[]` column) for a list or set of scalars."""
    if t.name in ("list", "set"):
        return CqlType(t.name, (TEXT,), frozen=t.frozen)
    return TEXT


def partial_text(value: str, keep: int, from_end: bool, marker: str) -> str:
    """The kept characters with the marker standing for the rest; the marker alone when
    keeping them would show the whole value."""
    if keep == 0 or len(value) <= keep:
        return marker
    return marker + value[-keep:] if from_end else value[:keep] + marker


@dataclass(frozen=True)
class ColumnMask:
    """The rules resolved for one column: its own rule, or the rules of some of its fields
    (a UDT), with the key and marker they mask with."""

    source: CqlType  # the column's (or field's) Cassandra type
    rule: MaskRule | None  # None: only `fields` of the column (a UDT) are masked
    marker: str = DEFAULT_MARKER
    key: bytes = field(default=b"", repr=False)  # a secret: never shown
    fields: tuple[tuple[str, ColumnMask], ...] = ()  # UDT field -> its mask

    @property
    def per_element(self) -> bool:
        """Whether each element is masked: the column is a list or set."""
        return self.source.name in ("list", "set")

    @property
    def renders(self) -> bool:
        """Whether values are digested in their canonical text: a `hash` of a type that is
        not text."""
        return self.rule is not None and self.rule.method == "hash" and not is_text(self.source)

    @property
    def stored_type(self) -> CqlType:
        """The type whose PostgreSQL column (`cql.pg_type`) and converter hold the masked
        values: text (or text[]) for a rendered `hash`, a UDT whose digested fields are text,
        else the column's own type."""
        if self.renders:
            return as_text(self.source)
        if self.fields:
            masks = dict(self.fields)
            fields = tuple(
                (name, masks[name].stored_type if name in masks else t)
                for name, t in self.source.fields
            )
            return replace(self.source, fields=fields)
        return self.source

    def _rendering(self) -> Converter:
        render = text_rendering(self.source)
        assert render is not None  # MaskingPolicy.masks lets `hash` fit only types that render
        return render

    @property
    def rules(self) -> tuple[MaskRule, ...]:
        """Every rule this mask applies."""
        own = () if self.rule is None else (self.rule,)
        return own + tuple(r for _, mask in self.fields for r in mask.rules)

    def text_mask(self) -> Callable[[str], str | None]:
        """The function one text value is masked with."""
        rule, marker, key = self.rule, self.marker, self.key
        assert rule is not None
        if rule.method == "hash":
            return lambda v: hash_text(key, v)
        if rule.method == "partial":
            return lambda v: partial_text(v, rule.keep, rule.from_end, marker)
        if rule.method == "redact":
            return lambda v: marker
        return lambda v: None

    def mask(self) -> Converter:
        """The function a converted (PostgreSQL) value of the column is masked with; None
        stays None."""
        one = nullable(self.text_mask())
        if self.per_element:
            return lambda v: None if v is None else [one(x) for x in v]
        return one

    def field_mask(self) -> Converter:
        """The function a UDT field's decoded value is masked with before the column is
        converted: text (or each text element) masked, anything else left for the converter
        to refuse; `null` empties the field whatever it holds."""
        if self.rule is not None and self.rule.method == "null":
            return lambda v: None
        if self.renders:
            render, mask = self._rendering(), self.mask()
            return lambda v: mask(render(v))
        one = self.text_mask()
        if self.per_element:  # any collection: the driver's sets are its own SortedSet
            return lambda v: (
                v
                if isinstance(v, str | bytes | bytearray | Mapping) or not isinstance(v, Iterable)
                else [one(x) if isinstance(x, str) else x for x in v]
            )
        return lambda v: one(v) if isinstance(v, str) else v

    def _fields_masked(self, convert: Converter) -> Converter:
        """`convert` of the UDT value with the masked fields masked first (Debezium's struct
        and the Cassandra driver's named tuple alike)."""
        masks = {name: mask.field_mask() for name, mask in self.fields}

        def masked(v: Any) -> Any:
            if hasattr(v, "_asdict"):
                v = v._asdict()
            if isinstance(v, Mapping):
                v = {k: x if x is None or k not in masks else masks[k](x) for k, x in v.items()}
            return convert(v)

        return masked

    def unguarded(self, convert: Converter) -> Converter:
        """`convert` (an unguarded converter) then the mask; an InvalidValue carries the
        marker instead of the value. A `null` column converts nothing: no value of it can fail."""
        if self.rule is not None and self.rule.method == "null":
            return lambda v: None
        marker = self.marker
        # A UDT's fields are masked before conversion, a column's value after it.
        mask: Converter = (lambda v: v) if self.fields else self.mask()
        if self.renders:
            convert = self._rendering()
        if self.fields:
            if self.stored_type != self.source:  # digested fields are text
                convert = unguarded_converter(self.stored_type)
            convert = self._fields_masked(convert)

        def masked(v: Any) -> Any:
            try:
                converted = convert(v)
            except InvalidValue as exc:
                problem = exc.problem
            else:
                return mask(converted)
            # Raised outside the handler: the error keeps no reference to the one with the value.
            raise InvalidValue(problem, marker)

        return masked

    def guarded(self, t: CqlType, convert: Converter) -> Converter:
        """unguarded(convert) for any value (None stays None); a value that does not fit
        raises ConversionError saying why, with the marker where the value would be shown."""
        return guard(t, self.unguarded(convert), shown=self.marker)


@dataclass(frozen=True)
class MaskingPolicy:
    """Every rule with the key and marker they mask with: what a table's masks come from.
    MaskingError if a `hash` rule has no key."""

    rules: tuple[MaskRule, ...] = ()
    hash_key: bytes | None = field(default=None, repr=False)  # a secret: never shown
    marker: str = DEFAULT_MARKER

    def __post_init__(self) -> None:
        unkeyed = next((r for r in self.rules if r.method == "hash" and not self.hash_key), None)
        if unkeyed is not None:
            raise MaskingError(
                f"masking rule {unkeyed.text!r} needs a hash key: CDC_MASKING__HASH_KEY or "
                "CDC_VAULT__MASKING_KEY_SECRET"
            )

    def masks(
        self, keyspace: str, table: str, columns: Mapping[str, CqlType], key_columns: Iterable[str]
    ) -> dict[str, ColumnMask]:
        """The masks of keyspace.table's columns. MaskingError naming the rule if its column is
        not among `columns` (nor `column.field` a field of a UDT column), is part of the primary
        key, has a type the method does not fit, or has a rule of its own and of a field."""
        keys, key = set(key_columns), self.hash_key or b""
        masks: dict[str, ColumnMask] = {}
        by_field: dict[str, dict[str, ColumnMask]] = {}
        for rule in self.rules:
            if (rule.keyspace, rule.table) != (keyspace, table):
                continue
            column, _, field_name = rule.column.partition(".")
            if rule.column in columns or not field_name:
                column, field_name = rule.column, ""
            t = columns.get(column)
            if t is None:
                raise MaskingError(
                    f"masking rule {rule.text!r}: {keyspace}.{table} has no column "
                    f"{column!r} (it has {', '.join(sorted(columns))})"
                )
            if column in keys:
                raise MaskingError(
                    f"masking rule {rule.text!r}: {column!r} is part of the primary key, "
                    "which is never masked (rows and deletes are found by it)"
                )
            if field_name:
                fields = dict(t.fields)
                if t.name != "udt" or not fields:
                    raise MaskingError(
                        f"masking rule {rule.text!r}: {column!r} is {t}, not a UDT with known "
                        "fields; only a UDT column's fields can be masked one by one"
                    )
                if field_name not in fields:
                    raise MaskingError(
                        f"masking rule {rule.text!r}: {t} has no field {field_name!r} "
                        f"(it has {', '.join(fields)})"
                    )
                t = fields[field_name]
            if rule.method == "hash" and text_rendering(t) is None:
                raise MaskingError(
                    f"masking rule {rule.text!r}: hash fits scalar columns and fields and lists "
                    f"or sets of scalars, not {t}; use null for this "
                    f"{'field' if field_name else 'column'}"
                )
            if rule.method in ("redact", "partial") and not is_text(t):
                raise MaskingError(
                    f"masking rule {rule.text!r}: {rule.method} fits text, ascii and varchar "
                    f"columns and fields and lists or sets of them, not {t}; use hash or null "
                    f"for this {'field' if field_name else 'column'}"
                )
            mask = ColumnMask(t, rule, self.marker, key)
            if (field_name and column in masks) or (not field_name and column in by_field):
                raise MaskingError(
                    f"masking rule {rule.text!r}: {column!r} has a rule of its own and rules "
                    "of its fields; keep one or the other"
                )
            if field_name:
                by_field.setdefault(column, {})[field_name] = mask
            else:
                masks[column] = mask
        for column, field_masks in by_field.items():
            masks[column] = ColumnMask(
                columns[column], None, self.marker, key, tuple(field_masks.items())
            )
        return masks


def masking_policy(settings: MaskingConfig) -> MaskingPolicy:
    """The policy the settings describe (MaskingError, a ConfigError, if a rule is malformed;
    whether a rule fits its table is checked when the table is first seen)."""
    key = settings.hash_key.reveal().encode() if settings.hash_key else None
    return MaskingPolicy(parse_rules(settings.rules), key, settings.marker)
