"""Decode stage: Kafka record bytes -> plain Python objects plus their Kafka Connect schemas.

The format is detected per record, for key and value independently:

- Confluent wire format (byte 0, a 4-byte big-endian schema id, an Avro body), read against
  the writer schema from the registry by a reader generated for that schema
  (`avro_codegen`), or by fastavro for a schema the generator leaves to it;
- JSON from Kafka Connect's JsonConverter, with (`{"schema": ..., "payload": ...}`) or without
  schemas.

Values come out as the converter wrote them. Avro: records are dicts, `bytes` are bytes, Connect
Decimals are exact `decimal.Decimal`s (`OversizedDecimal`s, unconverted, when their size alone
shows that PostgreSQL's numeric cannot hold them), Connect Date/Time/Timestamp stay ints, Connect
maps stored as arrays of MapEntry records stay lists of `{"key", "value"}` dicts (native Avro
maps are dicts).
JSON: bytes and Decimals are base64 strings, maps with string keys are objects, other maps are
lists of `[key, value]` pairs. The column schemas say which is which.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import fastavro
import fastavro.read
import msgspec
import structlog

from cdc_sink.decode.avro_codegen import DECIMAL_LOGICAL_TYPE, Reader, Unsupported, compile_reader
from cdc_sink.decode.nesting import MAX_NESTING, deeper_than
from cdc_sink.decode.registry import OnceCache, Refusals, SchemaRegistry
from cdc_sink.errors import DecodeError
from cdc_sink.model.events import RANGE_FIELDS
from cdc_sink.model.scalars import decimal_from_bytes

__all__ = ["ConnectSchema", "DecodedRecord", "Decoder", "avro_to_connect", "rename_redefined_types"]

ConnectSchema = dict[str, Any]
"""A Kafka Connect schema in JsonConverter's JSON form: type, optional, name, version,
parameters, and fields (each with a "field" name) / items / keys / values."""

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class DecodedRecord:
    """One Kafka record, decoded. Schema dicts are shared between records: never mutate them.

    `key_schema` maps each key field to its schema; `column_schemas` maps each column of `after`
    to the schema of its cell's `value` (not of the cell). Both are {} without a schema. `format`
    is the value's ("avro" | "json" | "json-schemaless"), or the key's for a tombstone.
    """

    key: dict[str, Any] | None
    value: dict[str, Any] | None
    key_schema: dict[str, ConnectSchema]
    column_schemas: dict[str, ConnectSchema]
    schema_id: int | None
    format: str


@dataclass(frozen=True, slots=True)
class _Schemas:
    """What one writer schema says about a record: its top-level fields and its cells."""

    fields: dict[str, ConnectSchema]
    columns: dict[str, ConnectSchema]

    @classmethod
    def of(cls, schema: Any) -> _Schemas:
        return cls(_struct_fields(schema), _column_schemas(schema))


@dataclass(frozen=True, slots=True)
class _AvroWriter:
    parsed: Any  # fastavro's parsed form of the writer schema
    schemas: _Schemas
    read: Reader | None  # generated for this schema; None: fastavro reads it


# (decoded object or None, schemas, schema id, format)
_Part = tuple[dict[str, Any] | None, _Schemas, int | None, str]

_SCHEMA_ID = struct.Struct(">i")  # signed, as Java's ByteBuffer.getInt() reads it
_ENVELOPE_HEAD = b'{"schema":'  # JsonConverter writes compact JSON, schema first
_PAYLOAD_SEP = b',"payload":'
_WHITESPACE = b" \t\r\n"
_JSON_OPENERS = (b"{", b"[")  # "[" only to say "not an object" rather than "not JSON"
_JSON_SCHEMA_LENGTHS = 64  # distinct schema lengths cached ...
_JSON_SCHEMAS_PER_LENGTH = 4  # ... and schemas of one length: at most 256 in all
_FAST_JSON = msgspec.json.Decoder()


class Decoder:
    """Decodes Kafka records; one per process, since its caches make the per-record path cheap.

    Writer schemas are fetched once per id (concurrent records of a new id share the fetch) and
    parsed once. An id the registry refused is refused again without asking for
    `unknown_id_ttl` seconds (at most `max_refused_ids` of them are remembered), so a flood of
    bad records does not become a flood of requests.
    """

    def __init__(
        self,
        registry: SchemaRegistry,
        *,
        unknown_id_ttl: float = 30.0,
        max_refused_ids: int = 10_000,
    ) -> None:
        self._registry = registry
        self._avro: OnceCache[int, _AvroWriter] = OnceCache()
        self._refused: Refusals[int] = Refusals(unknown_id_ttl, max_refused_ids)
        # Derived schemas of schemaful JSON: raw schema bytes and what they say, by their length.
        self._json: dict[int, deque[tuple[bytes, _Schemas]]] = {}

    async def decode(self, key: bytes | None, value: bytes | None) -> DecodedRecord:
        """Decode one record; DecodeError if it cannot be, TransientError if the registry is
        unreachable (retry), FatalError if the registry refuses us (stop)."""
        k = None if key is None else await self._part(key, "key")
        v = None if value is None else await self._part(value, "value")
        fmt = v[3] if v is not None else k[3] if k is not None else "json-schemaless"
        return DecodedRecord(
            key=None if k is None else k[0],
            value=None if v is None else v[0],
            key_schema={} if k is None else k[1].fields,
            column_schemas={} if v is None else v[1].columns,
            schema_id=None if v is None else v[2],
            format=fmt,
        )

    @property
    def refused_ids(self) -> int:
        """How many refused schema ids are remembered."""
        return len(self._refused)

    async def prefetch(self, parts: Iterable[object]) -> None:
        """Look up at once, concurrently, the writer schemas of these keys and values (records
        about to be decoded) not known yet, so that their records do not each wait for the
        registry in turn. Never raises: decoding a record reports what went wrong for it."""
        wanted = {
            _SCHEMA_ID.unpack_from(data, 1)[0]
            for data in parts
            if isinstance(data, bytes) and len(data) >= 5 and data[0] == 0
        }.difference(self._avro.values)
        if wanted:  # _load_avro refuses again, without asking, an id refused before
            await asyncio.gather(*(self._load_avro(i) for i in wanted), return_exceptions=True)

    async def _part(self, data: bytes, what: str) -> _Part:
        head = data[:1]
        if head == b"\x00":
            return await self._avro_part(data, what)
        if head in _JSON_OPENERS or (
            head and head in _WHITESPACE and data.lstrip()[:1] in _JSON_OPENERS
        ):
            return self._json_part(data, what)
        raise DecodeError(
            f"{what} is neither Confluent Avro (magic byte 0) nor a JSON object: {_preview(data)}"
        )

    async def _avro_part(self, data: bytes, what: str) -> _Part:
        if len(data) < 5:
            raise DecodeError(
                f"{what} is too short for the Confluent wire format header: {_preview(data)}"
            )
        (schema_id,) = _SCHEMA_ID.unpack_from(data, 1)
        writer = self._avro.values.get(schema_id)
        if writer is None:
            writer = await self._load_avro(schema_id)
        try:
            if writer.read is not None and type(data) is bytes:
                obj, end = writer.read(data, 5)
            else:
                stream = io.BytesIO(data)
                stream.seek(5)
                obj = fastavro.schemaless_reader(stream, writer.parsed, return_record_name=False)
                end = stream.tell()
        except Exception as exc:  # fastavro reports bad bytes with many types (EOF, Index, ...)
            detail = exc if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
            raise DecodeError(
                f"{what} Avro body does not match writer schema id {schema_id}: {detail}"
            ) from exc
        if end != len(data):
            raise DecodeError(
                f"{what} has {len(data) - end} bytes left after the Avro datum: "
                f"the body does not match writer schema id {schema_id}"
            )
        if not isinstance(obj, dict):
            raise DecodeError(
                f"{what} writer schema id {schema_id} is not a record but {type(obj).__name__}"
            )
        return obj, writer.schemas, schema_id, "avro"

    async def _load_avro(self, schema_id: int) -> _AvroWriter:
        if schema_id < 0:
            raise DecodeError(f"invalid schema id {schema_id} in the Confluent header")
        refused = self._refused.get(schema_id)
        if refused is not None:
            raise DecodeError(refused)
        try:
            return await self._avro.get(schema_id, partial(self._fetch_avro, schema_id))
        except DecodeError as exc:
            self._refused.add(schema_id, str(exc))
            raise

    async def _fetch_avro(self, schema_id: int) -> _AvroWriter:
        text = await self._registry.schema_by_id(schema_id)
        too_deep = f"writer schema id {schema_id} nests deeper than {MAX_NESTING} levels"
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"writer schema id {schema_id} is not JSON: {exc}") from exc
        except RecursionError:  # far deeper: the parser ran out of stack
            raise DecodeError(too_deep) from None
        if deeper_than(schema):  # everything below walks the schema recursively
            raise DecodeError(too_deep)
        try:
            parsed = fastavro.parse_schema(_reader_form(rename_redefined_types(schema)))
            connect = avro_to_connect(schema)
        except Exception as exc:  # fastavro's parse errors have no common base class
            raise DecodeError(
                f"writer schema id {schema_id} is not a usable Avro schema: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            read: Reader | None = compile_reader(parsed)
        except Unsupported as exc:
            read = None
            log.debug("avro_reader_not_generated", schema_id=schema_id, reason=str(exc))
        return _AvroWriter(parsed, _Schemas.of(connect), read)

    def _json_part(self, data: bytes, what: str) -> _Part:
        if data.startswith(_ENVELOPE_HEAD):
            hit = self._json_known_schema(data)
            if hit is not None:
                return hit
        try:
            obj = _parse_json(data)
        except ValueError as exc:
            raise DecodeError(f"{what} is not valid JSON: {exc}; {_preview(data)}") from exc
        except RecursionError:  # the parser ran out of stack
            raise DecodeError(f"{what} nests deeper than {MAX_NESTING} levels") from None
        if isinstance(obj, dict) and len(obj) == 2 and "schema" in obj and "payload" in obj:
            payload, fmt = obj["payload"], "json"
            schemas = self._json_schemas(data, obj["schema"], what)
        else:
            payload, schemas, fmt = obj, _Schemas({}, {}), "json-schemaless"
        if payload is not None and not isinstance(payload, dict):
            raise DecodeError(f"{what} JSON is {_json_kind(payload)}, not an object")
        return payload, schemas, None, fmt

    def _json_known_schema(self, data: bytes) -> _Part | None:
        """Decode only the payload when the record's schema is one seen before, byte for byte.

        The schema, usually several times larger than the payload and the same in every record
        of a table, is neither parsed nor copied nor hashed: its length, read from the position
        of `,"payload":` (looked for from the end first, the payload being the short part, then
        from the start: a nested "payload" key only makes a guess miss), picks the cached
        schemas it may be, and a comparison in place proves which one. Only complete objects are
        cached, so a schema proven present ends exactly where the separator starts. Anything
        unusual returns None and the full parse decides.
        """
        start = len(_ENVELOPE_HEAD)
        sep = data.rfind(_PAYLOAD_SEP, start)
        if sep < 0:
            return None
        schemas = self._cached_json_schemas(data, sep)
        if schemas is None:
            first = data.find(_PAYLOAD_SEP, start, sep)
            schemas = None if first < 0 else self._cached_json_schemas(data, first)
            if schemas is None:
                return None
            sep = first
        end = len(data.rstrip(_WHITESPACE)) - 1  # no copy unless there is whitespace to strip
        if data[end] != ord("}"):
            return None
        try:
            payload = _FAST_JSON.decode(memoryview(data)[sep + len(_PAYLOAD_SEP) : end])
        except (msgspec.DecodeError, RecursionError):  # the full parse gives the error
            return None
        if payload is not None and not isinstance(payload, dict):
            return None
        return payload, schemas, None, "json"

    def _cached_json_schemas(self, data: bytes, sep: int) -> _Schemas | None:
        """The cached schemas whose raw schema is `data` between the envelope head and `sep`."""
        start = len(_ENVELOPE_HEAD)
        for raw, schemas in self._json.get(sep - start, ()):
            if data.startswith(raw, start):
                return schemas
        return None

    def _json_schemas(self, data: bytes, schema: Any, what: str) -> _Schemas:
        if deeper_than(schema):  # comparing it below and deriving types later recurse
            raise DecodeError(f"{what} schema nests deeper than {MAX_NESTING} levels")
        schemas = _Schemas.of(schema)
        sep = data.find(_PAYLOAD_SEP, len(_ENVELOPE_HEAD))
        if isinstance(schema, dict) and data.startswith(_ENVELOPE_HEAD) and sep > 0:
            raw = data[len(_ENVELOPE_HEAD) : sep]
            # Cache only a split proven right, so the fast path can trust any schema it finds.
            if _loads_or_none(raw) == schema:
                self._cache_json_schemas(raw, schemas)
        return schemas

    def _cache_json_schemas(self, raw: bytes, schemas: _Schemas) -> None:
        if len(raw) not in self._json and len(self._json) >= _JSON_SCHEMA_LENGTHS:
            del self._json[next(iter(self._json))]
        same_length = self._json.setdefault(len(raw), deque(maxlen=_JSON_SCHEMAS_PER_LENGTH))
        if all(known != raw for known, _ in same_length):  # else its payload took the full parse
            same_length.append((raw, schemas))


def _struct_fields(schema: Any) -> dict[str, ConnectSchema]:
    """Field name -> field schema (without its "field" key) of a Connect struct; {} otherwise."""
    fields = schema.get("fields") if isinstance(schema, dict) else None
    if not isinstance(fields, list):
        return {}
    return {
        f["field"]: {k: v for k, v in f.items() if k != "field"}
        for f in fields
        if isinstance(f, dict) and isinstance(f.get("field"), str)
    }


def _column_schemas(envelope: Any) -> dict[str, ConnectSchema]:
    """Column -> schema of the cell's `value`, for the cells of the envelope's `after` struct."""
    columns = {}
    for column, cell in _struct_fields(_struct_fields(envelope).get("after")).items():
        value = _struct_fields(cell).get("value")
        if value is not None and column not in RANGE_FIELDS:
            columns[column] = value
    return columns


# --- Avro schema handling ---------------------------------------------------------------------

_NAMED = frozenset({"record", "error", "enum", "fixed"})
_AVRO_PRIMITIVES = {
    "null": "null",  # no Connect counterpart; only meaningful inside a union
    "boolean": "boolean",
    "int": "int32",
    "long": "int64",
    "float": "float",
    "double": "double",
    "bytes": "bytes",
    "string": "string",
}
_CONNECT_LOGICAL = {
    ("int", "date"): "org.apache.kafka.connect.data.Date",
    ("int", "time-millis"): "org.apache.kafka.connect.data.Time",
    ("long", "timestamp-millis"): "org.apache.kafka.connect.data.Timestamp",
}
_DECIMAL = "org.apache.kafka.connect.data.Decimal"
_AVRODATA = "io.confluent.connect.avro"
_MAP_ENTRY = f"{_AVRODATA}.MapEntry"


def _full_name(named: dict[str, Any], namespace: str) -> tuple[str, str]:
    """(namespace for nested definitions, full name) of a named type, resolved as fastavro does."""
    name: str = named["name"]
    if "." in name:
        return name.rsplit(".", 1)[0], name
    space = named.get("namespace", namespace) or ""
    return space, f"{space}.{name}" if space else name


def rename_redefined_types(schema: Any) -> Any:
    """Copy of an Avro schema (parsed JSON) in which each redefinition of a named type that is
    already defined gets a fresh name, `<name>__2`, `<name>__3`, ...

    Avro forbids defining a name twice and fastavro refuses such schemas, yet Debezium's
    Cassandra connector names every cell struct `cell_value` (and AvroData names every map entry
    `MapEntry`), so registered envelopes can define them once per column type. Names take no part
    in the binary encoding, so decoding stays exact. References by name are left alone and, as in
    Avro's own resolution, keep meaning the first definition. The input is not modified.
    """
    taken = _short_names(schema)
    defined: set[str] = set()

    def walk(node: Any, namespace: str) -> Any:
        if isinstance(node, list):
            return [walk(member, namespace) for member in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        kind = node.get("type")
        if isinstance(kind, str) and kind in _NAMED and isinstance(node.get("name"), str):
            inner, full = _full_name(node, namespace)
            if full in defined:
                n = 2
                while f"{node['name']}__{n}".rsplit(".", 1)[-1] in taken:
                    n += 1
                node["name"] = f"{node['name']}__{n}"
                taken.add(node["name"].rsplit(".", 1)[-1])
                full = _full_name(node, namespace)[1]
            defined.add(full)
            if isinstance(node.get("fields"), list):
                node["fields"] = [
                    {**f, "type": walk(f["type"], inner)}
                    if isinstance(f, dict) and "type" in f
                    else f
                    for f in node["fields"]
                ]
        elif kind == "array" and "items" in node:
            node["items"] = walk(node["items"], namespace)
        elif kind == "map" and "values" in node:
            node["values"] = walk(node["values"], namespace)
        elif isinstance(kind, (dict, list)):
            node["type"] = walk(kind, namespace)
        return node

    return walk(schema, "")


def _short_names(node: Any) -> set[str]:
    """Last components of every name defined anywhere in a schema (over-inclusive on purpose)."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind, name = item.get("type"), item.get("name")
            if isinstance(kind, str) and kind in _NAMED and isinstance(name, str):
                found.add(name.rsplit(".", 1)[-1])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _reader_form(node: Any) -> Any:
    """Copy of a schema without what fastavro would reject or convert lossily but reading does
    not need: field defaults and logical types other than decimal. Decimals are read by
    `_read_decimal` rather than fastavro's reader, which rounds to the declared precision and
    converts a value of any size, in time quadratic in its length."""
    if isinstance(node, list):
        return [_reader_form(member) for member in node]
    if not isinstance(node, dict):
        return node
    node = {k: _reader_form(v) if k in ("type", "items", "values") else v for k, v in node.items()}
    if isinstance(node.get("fields"), list):
        node["fields"] = [
            {k: _reader_form(v) if k == "type" else v for k, v in f.items() if k != "default"}
            if isinstance(f, dict)
            else f
            for f in node["fields"]
        ]
    logical = node.get("logicalType")
    if logical == "decimal" and node.get("type") in ("bytes", "fixed"):
        scale = node.get("scale", 0)
        if type(scale) is not int or scale < 0:
            raise ValueError(f"decimal scale {scale!r} is not a whole number")
        node["logicalType"] = DECIMAL_LOGICAL_TYPE
    elif logical is not None:
        del node["logicalType"]
    return node


def _read_decimal(data: Any, writer_schema: dict[Any, Any] | None, _: Any = None) -> Any:
    """fastavro's logical reader for DECIMAL_LOGICAL_TYPE: a Connect Decimal's bytes, converted
    only if their size allows a PostgreSQL numeric (else an OversizedDecimal)."""
    return decimal_from_bytes(data, (writer_schema or {}).get("scale", 0))


# fastavro looks logical readers up by "<type>-<logicalType>" in this dict. The name is the
# sink's own: fastavro's standard decimal reader stays as it is for any other user.
for _kind in ("bytes", "fixed"):
    fastavro.read.LOGICAL_READERS[f"{_kind}-{DECIMAL_LOGICAL_TYPE}"] = _read_decimal


def avro_to_connect(schema: Any) -> ConnectSchema:
    """The Kafka Connect schema Confluent's AvroData derives from an Avro schema (parsed JSON).

    Honours AvroData's properties (connect.name, connect.version, connect.doc,
    connect.parameters, connect.type int8/int16), decimal/date/time-millis/timestamp-millis
    logical types, and maps encoded as arrays of MapEntry records. A redefined name is converted
    from its own definition; a reference by name means the first definition.
    """
    return _AvroToConnect().convert(schema, "", optional=False)


class _AvroToConnect:
    def __init__(self) -> None:
        # full name -> (Avro definition, its Connect schema), first definition wins
        self.named: dict[str, tuple[dict[str, Any], ConnectSchema]] = {}
        self.open: set[str] = set()  # records whose fields are being converted

    def convert(self, avro: Any, namespace: str, *, optional: bool) -> ConnectSchema:
        if isinstance(avro, list):
            return self._union(avro, namespace, optional)
        if isinstance(avro, str):
            if avro in _AVRO_PRIMITIVES:
                return {"type": _AVRO_PRIMITIVES[avro], "optional": optional}
            return {**self._lookup(avro, namespace)[1], "optional": optional}
        kind = avro["type"]
        if not isinstance(kind, str):  # {"type": {...}} merely wraps a schema
            return self.convert(kind, namespace, optional=optional)
        node: ConnectSchema = {"type": _AVRO_PRIMITIVES.get(kind, kind), "optional": optional}
        if kind in _NAMED:
            inner, full = _full_name(avro, namespace)
            self.named.setdefault(full, (avro, node))
            if kind != "fixed" and full != f"{_AVRODATA}.ConnectDefault":
                node["name"] = full
        _annotate(node, avro)
        if kind in ("record", "error"):
            node["type"] = "struct"
            self.open.add(full)
            node["fields"] = [
                {"field": field["name"], **self.convert(field["type"], inner, optional=False)}
                for field in avro.get("fields", [])
            ]
            self.open.discard(full)
        elif kind == "enum":
            node["type"] = "string"
            node["parameters"] = {
                f"{_AVRODATA}.Enum": full,
                **{f"{_AVRODATA}.Enum.{s}": s for s in avro.get("symbols", [])},
                **node.get("parameters", {}),
            }
        elif kind == "fixed":
            node["type"] = "bytes"
        elif kind == "array":
            items = self.convert(avro["items"], namespace, optional=False)
            entry = _struct_fields(items)
            if entry.keys() == {"key", "value"} and self._is_map_entry(avro, namespace, items):
                node.update(type="map", keys=entry["key"], values=entry["value"])
            else:
                node["items"] = items
        elif kind == "map":
            node["keys"] = {"type": "string", "optional": False}
            node["values"] = self.convert(avro["values"], namespace, optional=False)
        elif kind not in _AVRO_PRIMITIVES:
            raise ValueError(f"unknown Avro type {kind!r}")
        return node

    def _union(self, members: list[Any], namespace: str, optional: bool) -> ConnectSchema:
        branches = [
            (member, self.convert(member, namespace, optional=True))
            for member in members
            if member != "null" and not (isinstance(member, dict) and member.get("type") == "null")
        ]
        nullable = len(branches) < len(members)
        if nullable and len(members) == 2:
            return branches[0][1]  # ["null", X]: an optional X
        return {
            "type": "struct",
            "optional": optional or nullable,
            "name": f"{_AVRODATA}.Union",
            "fields": [{"field": self._branch_name(m, namespace), **s} for m, s in branches],
        }

    def _branch_name(self, member: Any, namespace: str) -> str:
        if isinstance(member, str) and member not in _AVRO_PRIMITIVES:
            member = self._lookup(member, namespace)[0]
        if isinstance(member, dict):
            if member.get("type") in ("record", "error", "enum"):
                return str(member["name"]).rsplit(".", 1)[-1]
            return str(member.get("type"))
        return str(member)

    def _lookup(self, name: str, namespace: str) -> tuple[dict[str, Any], ConnectSchema]:
        qualified = f"{namespace}.{name}" if namespace and "." not in name else name
        full = qualified if qualified in self.named else name
        found = self.named.get(full)
        if found is None:
            raise ValueError(f"unknown Avro type {name!r}")
        if full in self.open:
            # fastavro reads such a type by recursing in C: a datum nested deeply enough (or a
            # type with no way out) overflows the stack and kills the process. Debezium's
            # connector never writes one.
            raise ValueError(f"Avro type {name!r} contains itself; recursive types are refused")
        return found

    def _is_map_entry(self, array: dict[str, Any], namespace: str, items: ConnectSchema) -> bool:
        """Whether an array is AvroData's encoding of a Connect map (entries with key and value)."""
        entry = array["items"]
        if isinstance(entry, str) and entry not in _AVRO_PRIMITIVES:
            entry = self._lookup(entry, namespace)[0]
        return isinstance(entry, dict) and (
            items.get("name") == _MAP_ENTRY
            or entry.get("connect.internal.type") == "MapEntry"
            or "map" in (entry.get("connect.type"), array.get("connect.type"))
        )


def _annotate(node: ConnectSchema, avro: dict[str, Any]) -> None:
    """Set the Connect name, version, doc and parameters an Avro schema's properties carry."""
    kind: str = avro["type"]
    logical: str = avro.get("logicalType", "")
    if logical == "decimal" and kind in ("bytes", "fixed"):
        node.update(name=_DECIMAL, version=1, parameters={"scale": str(avro.get("scale", 0))})
        precision = avro.get("precision")
        if isinstance(precision, int) and precision != 64:  # 64 is AvroData's default
            node["parameters"]["connect.decimal.precision"] = str(precision)
    elif (kind, logical) in _CONNECT_LOGICAL:
        node.update(name=_CONNECT_LOGICAL[kind, logical], version=1)
    if kind == "int" and avro.get("connect.type") in ("int8", "int16"):
        node["type"] = avro["connect.type"]
    for prop, key, expected in (
        ("connect.name", "name", str),
        ("connect.version", "version", int),
        ("connect.doc", "doc", str),
    ):
        if isinstance(avro.get(prop), expected):
            node[key] = avro[prop]
    parameters = avro.get("connect.parameters")
    if isinstance(parameters, dict):
        node["parameters"] = {**node.get("parameters", {}), **parameters}


# --- small helpers ----------------------------------------------------------------------------


def _preview(data: bytes) -> str:
    more = " ..." if len(data) > 16 else ""
    return f"{len(data)} bytes, starting {data[:16].hex(' ') or '(empty)'}{more}"


def _json_kind(value: Any) -> str:
    kinds = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return kinds.get(type(value), type(value).__name__)


def _parse_json(data: bytes) -> Any:
    """`json.loads(data)`, faster: msgspec parses what it accepts, which it reads as the standard
    library does (integers of any size stay exact), and json.loads decides everything else (NaN,
    Infinity, numbers out of float range, lone surrogates, UTF-16/32, a BOM, and every error), so
    that values and error messages are the standard library's."""
    try:
        return _FAST_JSON.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(data)


def _loads_or_none(raw: bytes) -> Any:
    try:
        return _parse_json(raw)
    except (ValueError, RecursionError):
        return None
