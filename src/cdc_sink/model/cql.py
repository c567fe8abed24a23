"""Cassandra column types: the CqlType grammar, types read from Kafka Connect schemas, and each
type's PostgreSQL column type. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

MAX_TYPE_DEPTH = 32
"""How deeply types may nest (list<int> is two levels). Far beyond any real schema, and it
bounds every recursion over a type or a value of unknown type, so none can exhaust the stack."""


@dataclass(frozen=True)
class CqlType:
    """A Cassandra column type.

    `frozen` is only ever True on list/set/map/tuple/udt: for frozen<...>, for tuples (always
    frozen in Cassandra), and for such types nested inside a collection, tuple or udt (where
    Cassandra requires them to be frozen).
    """

    name: str
    params: tuple[CqlType, ...] = ()
    fields: tuple[tuple[str, CqlType], ...] = ()
    frozen: bool = False
    udt_name: str | None = None

    def __str__(self) -> str:
        if self.name == "udt":
            inner = _quote_name(self.udt_name or "udt")
        elif self.params:
            inner = f"{self.name}<{', '.join(map(str, self.params))}>"
        else:
            inner = self.name
        return f"frozen<{inner}>" if self.frozen else inner


_PG_SCALAR = {
    "ascii": "text",
    "text": "text",
    "varchar": "text",
    "boolean": "boolean",
    "tinyint": "smallint",
    "smallint": "smallint",
    "int": "integer",
    "bigint": "bigint",
    "counter": "bigint",
    "varint": "numeric",
    "decimal": "numeric",
    "float": "real",
    "double": "double precision",
    "blob": "bytea",
    "uuid": "uuid",
    "timeuuid": "uuid",
    "inet": "inet",
    "timestamp": "timestamptz",
    "date": "date",
    "time": "time",
    "duration": "interval",
}
_ARITY = {"list": 1, "set": 1, "map": 2}


def is_multi_cell(t: CqlType) -> bool:
    """A non-frozen collection: Cassandra stores each element as a cell of its own."""
    return t.name in _ARITY and not t.frozen


def _quote_name(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _nest(t: CqlType) -> CqlType:
    """The type as it is when nested: non-scalars inside collections are always frozen."""
    return replace(t, frozen=True) if t.name not in _PG_SCALAR and not t.frozen else t


def udt_definitions(types: Iterable[CqlType]) -> dict[str, list[tuple[str, str]]]:
    """Every UDT used in `types` (nested ones too) as name -> [(field, type text)]: what
    `parse_cql_type` needs to rebuild the types from their text."""
    found: dict[str, list[tuple[str, str]]] = {}

    def visit(t: CqlType) -> None:
        if t.name == "udt" and t.udt_name and t.udt_name not in found:
            found[t.udt_name] = [(field, str(inner)) for field, inner in t.fields]
        for inner in (*t.params, *(f for _, f in t.fields)):
            visit(inner)

    for t in types:
        visit(t)
    return found


# --- parsing Cassandra's type text -------------------------------------------------------------

_TOKEN = re.compile(
    r'\s*(?:(?P<sym>[<>,])|"(?P<quoted>(?:[^"]|"")+)"|(?P<word>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?))',
    re.ASCII,
)


def parse_cql_type(
    text: str, udts: Mapping[str, Sequence[tuple[str, str]]] | None = None
) -> CqlType:
    """Parse a system_schema type string ("frozen<map<text, frozen<list<int>>>>", "address").

    `udts` maps UDT name -> [(field, type text)] for the keyspace. When it is given, a name not
    in it is an error; when it is None, UDTs come back with empty `fields`. ValueError on
    anything that is not a supported type, or one nested deeper than MAX_TYPE_DEPTH.
    """
    return _parse(text, udts, nested=False, seen=(), depth=0)


def _bad_type(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid CQL type {text!r}: {reason}")


def _parse(
    text: str,
    udts: Mapping[str, Sequence[tuple[str, str]]] | None,
    nested: bool,
    seen: tuple[str, ...],
    depth: int,
) -> CqlType:
    tokens: list[tuple[str, str]] = []
    pos, stripped = 0, text.strip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None:
            raise _bad_type(text, f"cannot read it at offset {pos}")
        kind = str(m.lastgroup)  # the one group that matched: sym, quoted or word
        tokens.append((kind, m[kind].replace('""', '"') if kind == "quoted" else m[kind]))
        pos = m.end()
    parser = _Parser(text, tokens, udts, depth)
    result = parser.parse_type(nested, seen)
    if parser.pos != len(tokens):
        raise _bad_type(text, "text follows the type")
    return result


class _Parser:
    """Recursive descent over the tokens of one type string."""

    def __init__(
        self,
        text: str,
        tokens: list[tuple[str, str]],
        udts: Mapping[str, Sequence[tuple[str, str]]] | None,
        depth: int,
    ) -> None:
        self.text, self.tokens, self.udts, self.pos = text, tokens, udts, 0
        self.depth = depth  # types enclosing the one being parsed (UDTs included)

    def _next(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise _bad_type(self.text, "it ends too early")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def _params(self, seen: tuple[str, ...], *, inner: bool = True) -> tuple[CqlType, ...]:
        """The types between < and >: one level deeper, unless they are frozen<>'s."""
        if self._next() != ("sym", "<"):
            raise _bad_type(self.text, "'<' expected")
        if inner:
            self._enter()
        params = [self.parse_type(True, seen)]
        while (token := self._next()) == ("sym", ","):
            params.append(self.parse_type(True, seen))
        if token != ("sym", ">"):
            raise _bad_type(self.text, "'>' or ',' expected")
        if inner:
            self.depth -= 1
        return tuple(params)

    def _enter(self) -> None:
        """One level deeper (the caller steps back once done): ValueError past the limit."""
        self.depth += 1
        if self.depth >= MAX_TYPE_DEPTH:
            raise _bad_type(self.text, f"nested deeper than {MAX_TYPE_DEPTH} levels")

    def parse_type(self, nested: bool, seen: tuple[str, ...]) -> CqlType:
        kind, word = self._next()
        if kind == "sym":
            raise _bad_type(self.text, f"unexpected {word!r}")
        if kind == "quoted":
            return self._udt(word, nested, seen)
        low = word.lower()
        if low == "frozen":
            params = self._params(seen, inner=False)
            if len(params) != 1 or params[0].name in _PG_SCALAR:
                raise _bad_type(self.text, "frozen<> takes one collection, tuple or UDT")
            return replace(params[0], frozen=True)
        if low in _ARITY:
            params = self._params(seen)
            if len(params) != _ARITY[low]:
                raise _bad_type(self.text, f"{low} takes {_ARITY[low]} type(s)")
            return CqlType(low, tuple(map(_nest, params)), frozen=nested)
        if low == "tuple":
            return CqlType("tuple", tuple(map(_nest, self._params(seen))), frozen=True)
        if self.tokens[self.pos : self.pos + 1] == [("sym", "<")]:
            raise _bad_type(self.text, f"{word!r} is not supported")
        if low in _PG_SCALAR:
            return CqlType(low)
        return self._udt(word.rpartition(".")[2], nested, seen)

    def _udt(self, name: str, frozen: bool, seen: tuple[str, ...]) -> CqlType:
        if self.udts is None:
            return CqlType("udt", frozen=frozen, udt_name=name)
        if name not in self.udts:
            raise _bad_type(self.text, f"no type or UDT is named {name!r}")
        if name in seen:
            raise _bad_type(self.text, f"UDT {name!r} contains itself")
        self._enter()
        fields = tuple(
            (field, _nest(_parse(type_text, self.udts, True, (*seen, name), self.depth)))
            for field, type_text in self.udts[name]
        )
        self.depth -= 1
        return CqlType("udt", fields=fields, frozen=frozen, udt_name=name)


# --- Kafka Connect schemas ---------------------------------------------------------------------

_CONNECT_LOGICAL = {
    "io.debezium.time.Timestamp": "timestamp",
    "io.debezium.time.Date": "date",
    "io.debezium.time.NanoDuration": "duration",
    "io.debezium.time.NanoTime": "time",
    "io.debezium.data.Uuid": "uuid",
    "io.debezium.data.VariableScaleDecimal": "decimal",
}
_CONNECT_PLAIN = {
    "int8": "tinyint",
    "int16": "smallint",
    "int32": "int",
    "int64": "bigint",
    "float": "float",
    "float32": "float",
    "double": "double",
    "float64": "double",
    "boolean": "boolean",
    "string": "text",
    "bytes": "blob",
}


def from_connect_schema(schema: Mapping[str, Any]) -> CqlType:
    """Best-effort CqlType from a Kafka Connect JSON schema as Debezium's Cassandra connector
    writes it. Debezium sends time as plain int64, inet and string-mode decimals as plain
    strings: these come back as bigint/text (prefer parse_cql_type when system_schema is at
    hand). Frozenness is unknown at the top level (False; tuples are always frozen).
    ValueError if the schema is not understood or nests types deeper than MAX_TYPE_DEPTH.
    """
    try:
        return _from_connect(schema, nested=False, depth=1)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid Kafka Connect schema: {exc!r}") from exc


def _from_connect(schema: Mapping[str, Any], nested: bool, depth: int) -> CqlType:
    if depth > MAX_TYPE_DEPTH:
        raise ValueError(
            f"invalid Kafka Connect schema: nested deeper than {MAX_TYPE_DEPTH} levels"
        )
    kind, name = schema.get("type"), schema.get("name")
    if name in _CONNECT_LOGICAL:
        return CqlType(_CONNECT_LOGICAL[name])
    if name == "org.apache.kafka.connect.data.Decimal":
        scale = str((schema.get("parameters") or {}).get("scale", "0"))
        return CqlType("varint" if scale == "0" else "decimal")
    if kind in _CONNECT_PLAIN:
        return CqlType(_CONNECT_PLAIN[kind])
    if kind == "array":
        return CqlType(
            "list", (_nest(_from_connect(schema["items"], True, depth + 1)),), frozen=nested
        )
    if kind == "map":
        key, value = (_nest(_from_connect(schema[k], True, depth + 1)) for k in ("keys", "values"))
        return CqlType("map", (key, value), frozen=nested)
    if kind == "struct":
        fields = [
            (f["field"], _nest(_from_connect(f, True, depth + 1))) for f in schema.get("fields", [])
        ]
        names = [f for f, _ in fields]
        if (
            str(name or "").endswith("Tuple")
            and fields
            and names == [f"field{i}" for i in range(1, len(fields) + 1)]
        ):
            return CqlType("tuple", tuple(t for _, t in fields), frozen=True)
        udt_name = str(name).rpartition(".")[2] if name else None
        return CqlType("udt", fields=tuple(fields), frozen=nested, udt_name=udt_name)
    raise ValueError(f"invalid Kafka Connect schema: type {kind!r}, name {name!r}")


# --- PostgreSQL column types -------------------------------------------------------------------


def pg_type(t: CqlType) -> str:
    """The PostgreSQL column type: DESIGN.md's mapping; non-scalar elements make jsonb."""
    scalar = _PG_SCALAR.get(t.name)
    if scalar is not None:
        return scalar
    if t.name in ("list", "set"):
        element = _PG_SCALAR.get(t.params[0].name)
        if element is not None:
            return element + "[]"
    if t.name not in ("list", "set", "map", "tuple", "udt"):
        raise ValueError(f"unknown CQL type name {t.name!r}")
    return "jsonb"
