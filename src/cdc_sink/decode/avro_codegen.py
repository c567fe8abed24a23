"""Avro readers generated once per writer schema: plain Python, specialised, compiled once.

`compile_reader(parsed)` takes a writer schema in fastavro's parsed form (as the decoder parses
it) and returns `read(data, pos) -> (datum, end)`, which decodes the datum starting at `pos`
exactly as `fastavro.schemaless_reader(..., return_record_name=False)` does: records are dicts
in field order, enums strs, bytes and fixed bytes, strings strictly decoded UTF-8, ints and
longs read as fastavro's C reader reads them (64-bit, whatever their length), union and enum
indexes counted from the end when negative, and the decoder's decimal logical type converted
by `decimal_from_bytes`. The other logical types are already gone from the decoder's form.

A body that does not fit the schema raises DecodeError: truncated, a union or enum index out of
range, a negative length, bad UTF-8, or a block count larger than the bytes left could hold
(so a hostile count costs nothing; a valid datum can never need more items than that).

A schema the generator cannot read with certainty raises `Unsupported`, and the caller reads it
with fastavro: unknown types or logical types, self-containing types, array items that can be
zero bytes long (fastavro reads any count of them; bounding by bytes left would refuse some),
and anything too big or too deep for Python to compile.

Nothing from the schema ever becomes source text. The source is built from the generator's
own fixed fragments, identifiers it numbers itself (v0, k0, c0, ...) and branch positions it
counts; every value taken from the schema (field names, enum symbols, sizes, scales) is passed
in as an argument of the generated factory, `k<n>`, a constants table bound when the factory
is called. The code runs with no builtins: it can call only the helpers passed to it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cdc_sink.errors import DecodeError
from cdc_sink.model.scalars import decimal_from_bytes

__all__ = ["DECIMAL_LOGICAL_TYPE", "Reader", "Unsupported", "compile_reader"]

Reader = Callable[[bytes, int], tuple[Any, int]]
"""read(data, pos) -> (datum, position after it); DecodeError if the bytes do not fit."""

DECIMAL_LOGICAL_TYPE = "cdc-sink-decimal"
"""The logical type the decoder gives Connect Decimals in the schema fastavro parses."""

_MAX_LINES = 20_000  # beyond this, compiling costs more than fastavro would ever lose
_INT64 = (1 << 64) - 1
_MAX_COUNT = (1 << 63) - 1


class Unsupported(Exception):
    """The generator does not read this schema; read it with fastavro."""


def compile_reader(parsed: Any) -> Reader:
    """A reader for one writer schema in fastavro's parsed form; Unsupported if there is none."""
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    generator = _Generator(named if isinstance(named, dict) else {})
    generator.value(parsed, "v0", 3)
    params = ", ".join((*_HELPERS, *(f"k{n}" for n in range(len(generator.constants)))))
    source = "\n".join(
        [
            f"def make({params}):",
            "    def read(buf, pos):",
            "        len_ = size_(buf)",
            "        try:",
            *generator.lines,
            "        except error_ as exc:",
            "            raise fail_(exc) from exc",
            "        return v0, pos",
            "    return read",
        ]
    )
    namespace: dict[str, Any] = {"__builtins__": {}}
    try:
        exec(compile(source, "<avro reader>", "exec"), namespace)  # noqa: S102 - see the module docstring
    except (SyntaxError, RecursionError, MemoryError, ValueError) as exc:
        raise Unsupported(f"the reader does not compile: {type(exc).__name__}: {exc}") from None
    read: Reader = namespace["make"](*_HELPERS.values(), *generator.constants)
    return read


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at pos, kept to 64 bits as fastavro's C reader keeps it: each byte's
    bits are shifted by (7 * index) mod 64 and whatever passes bit 63 is lost."""
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << (shift & 63)
        shift += 7
    n &= _INT64
    return (n >> 1) ^ -(n & 1), pos


def _read_block(buf: bytes, pos: int, least: int) -> tuple[int, int]:
    """The item count of the next array or map block (0 at the end), each item at least
    `least` bytes long. A negative count is followed by the block's size in bytes."""
    while True:
        count, pos = _read_long(buf, pos)
        if count < 0:
            _, pos = _read_long(buf, pos)
            count = -count
            if count > _MAX_COUNT:
                continue  # fastavro's C negation of -2**63 wraps: a block with no items
        if count * least > len(buf) - pos:
            raise EOFError(f"a block of {count} items cannot fit in {len(buf) - pos} bytes")
        return count, pos


def _read_span(buf: bytes, pos: int) -> tuple[int, int]:
    """(start, end) of the bytes of a length-prefixed value whose prefix starts at pos."""
    length, pos = _read_long(buf, pos)
    if length < 0:
        raise EOFError(f"a negative length {length}")
    return pos, pos + length


def _union_branch(buf: bytes, pos: int, count: int) -> tuple[int, int]:
    """The union index at pos as twice the position of its branch among `count`: a negative
    index counts from the end, as fastavro's list indexing does."""
    index, pos = _read_long(buf, pos)
    if index < 0:
        index += count
    if not 0 <= index < count:
        raise IndexError(f"union index {index} out of range")
    return 2 * index, pos


def _short(length: int) -> EOFError:
    return EOFError(f"expected {length} bytes, fewer are left")


def _failure(exc: Exception) -> DecodeError:
    return DecodeError(f"{type(exc).__name__}: {exc}")


# Fixed names the generated code calls: its only way to reach anything outside itself.
_HELPERS: dict[str, Any] = {
    "mask_": _INT64,
    "block_": _read_block,
    "span_": _read_span,
    "union_": _union_branch,
    "short_": _short,
    "fail_": _failure,
    "error_": Exception,
    "f32_": struct.Struct("<f").unpack_from,
    "f64_": struct.Struct("<d").unpack_from,
    "dec_": decimal_from_bytes,
    "range_": range,
    "size_": len,
}

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# Fewest bytes of a value; boolean, int, long, bytes, string, enum, array, map: one at least.
_LEAST_SIZES: dict[object, int] = {"null": 0, "float": 4, "double": 8}


class _Generator:
    """Emits the statements that read one value into a variable, advancing `pos`."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.lines: list[str] = []
        self.constants: list[Any] = []
        self.count = 0
        self.open: set[str] = set()  # named records being expanded: a repeat is a cycle

    def const(self, value: Any) -> str:
        self.constants.append(value)
        return f"k{len(self.constants) - 1}"

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def emit(self, depth: int, text: str) -> None:
        if len(self.lines) >= _MAX_LINES:
            raise Unsupported(f"the reader would be over {_MAX_LINES} lines long")
        self.lines.append("    " * depth + text)

    def resolve(self, schema: Any) -> Any:
        """The definition behind a reference by name, or the schema itself."""
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            if schema not in self.named:
                raise Unsupported("a reference to an unknown type")
            return self.named[schema]
        return schema

    def value(self, schema: Any, into: str, depth: int) -> None:
        schema = self.resolve(schema)
        if isinstance(schema, list):
            self.union(schema, into, depth)
            return
        if isinstance(schema, str):
            self.primitive(schema, {}, into, depth)
            return
        if not isinstance(schema, dict):
            raise Unsupported("a schema that is neither a name, a union nor an object")
        kind = schema.get("type")
        if isinstance(kind, (dict, list)):
            self.value(kind, into, depth)
        elif kind in ("record", "error"):
            self.record(schema, into, depth)
        elif kind == "enum":
            self.enum(schema, into, depth)
        elif kind == "array":
            self.array(schema, into, depth)
        elif kind == "map":
            self.map(schema, into, depth)
        elif kind == "fixed":
            self.fixed(schema, into, depth)
        elif isinstance(kind, str) and kind in _PRIMITIVES:
            self.primitive(kind, schema, into, depth)
        else:
            raise Unsupported("an unknown Avro type")

    def long(self, into: str, depth: int) -> None:
        # _read_long, inlined: a call costs more than the loop for the usual 1-9 bytes.
        self.emit(depth, "b = buf[pos]; pos += 1")
        self.emit(depth, f"if b < 128: {into} = (b >> 1) ^ -(b & 1)")
        self.emit(depth, "else:")
        self.emit(depth + 1, "n = b & 127; s = 7; b = buf[pos]; pos += 1")
        self.emit(depth + 1, "while b & 128:")
        self.emit(depth + 2, "n |= (b & 127) << (s & 63); s += 7; b = buf[pos]; pos += 1")
        self.emit(depth + 1, f"n = (n | b << (s & 63)) & mask_; {into} = (n >> 1) ^ -(n & 1)")

    def length_prefixed(self, depth: int) -> None:
        """Reads a length prefix and leaves the end of the bytes in `e`: they are buf[pos:e].
        One byte, even, is a length of 0 to 63; anything else goes to the helper."""
        self.emit(depth, "b = buf[pos]")
        self.emit(depth, "if b & 129: pos, e = span_(buf, pos)")
        self.emit(depth, "else: pos += 1; e = pos + (b >> 1)")
        self.emit(depth, "if e > len_: raise short_(e - pos)")

    def primitive(self, kind: str, schema: dict[str, Any], into: str, depth: int) -> None:
        decimal = self.decimal_scale(schema)
        if decimal is not None and kind != "bytes":
            raise Unsupported(f"a decimal logical type on {kind}")
        if kind == "null":
            self.emit(depth, f"{into} = None")
        elif kind == "boolean":
            self.emit(depth, f"{into} = buf[pos] != 0; pos += 1")
        elif kind in ("int", "long"):
            self.long(into, depth)
        elif kind == "float":
            self.emit(depth, f"{into} = f32_(buf, pos)[0]; pos += 4")
        elif kind == "double":
            self.emit(depth, f"{into} = f64_(buf, pos)[0]; pos += 8")
        elif kind == "string":
            self.length_prefixed(depth)
            self.emit(depth, f"{into} = buf[pos:e].decode(); pos = e")
        else:
            self.length_prefixed(depth)
            self.take(into, decimal, depth)

    def take(self, into: str, decimal: str | None, depth: int) -> None:
        """Reads buf[pos:e] into `into`, as a decimal of that scale if `decimal` names one."""
        if decimal is None:
            self.emit(depth, f"{into} = buf[pos:e]; pos = e")
        else:
            self.emit(depth, f"{into} = dec_(buf[pos:e], {decimal}); pos = e")

    def decimal_scale(self, schema: dict[str, Any]) -> str | None:
        """The constant holding the scale of a decimal logical type, None without one."""
        logical = schema.get("logicalType")
        if logical is None:
            return None
        if logical != DECIMAL_LOGICAL_TYPE:
            raise Unsupported("a logical type the decoder does not read")
        scale = schema.get("scale", 0)
        if type(scale) is not int or scale < 0:
            raise Unsupported("a decimal scale that is not a whole number")
        return self.const(scale)

    def fixed(self, schema: dict[str, Any], into: str, depth: int) -> None:
        size = schema.get("size")
        if type(size) is not int or size < 0:
            raise Unsupported("a fixed size that is not a whole number")
        decimal, known = self.decimal_scale(schema), self.const(size)
        self.emit(depth, f"e = pos + {known}")
        self.emit(depth, f"if e > len_: raise short_({known})")
        self.take(into, decimal, depth)

    def enum(self, schema: dict[str, Any], into: str, depth: int) -> None:
        symbols = schema.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise Unsupported("enum symbols that are not strings")
        self.long("i", depth)
        # A tuple indexes as fastavro's list does, negative indexes from the end included.
        self.emit(depth, f"{into} = {self.const(tuple(symbols))}[i]")

    def record(self, schema: dict[str, Any], into: str, depth: int) -> None:
        name = schema.get("name")
        fields = schema.get("fields")
        if not isinstance(name, str) or not isinstance(fields, list):
            raise Unsupported("a record without a name or fields")
        if name in self.open:
            raise Unsupported("a type that contains itself")
        self.open.add(name)
        items = []
        for field in fields:
            if not isinstance(field, dict) or not isinstance(field.get("name"), str):
                raise Unsupported("a field without a name")
            if "type" not in field:
                raise Unsupported("a field without a type")
            var = self.fresh("v")
            self.value(field["type"], var, depth)
            items.append(f"{self.const(field['name'])}: {var}")
        self.open.discard(name)
        self.emit(depth, f"{into} = {{{', '.join(items)}}}")

    def union(self, branches: list[Any], into: str, depth: int) -> None:
        if not branches:
            raise Unsupported("an empty union")
        # A one-byte even index is the branch's zig-zag code (2 * position): the branches are
        # told apart by it directly. Any other index goes to the helper, which returns the code
        # of the branch it means or raises.
        count, codes = self.const(len(branches)), self.const(2 * len(branches))
        self.emit(depth, "b = buf[pos]; pos += 1")
        self.emit(depth, f"if b & 1 or b >= {codes}: b, pos = union_(buf, pos - 1, {count})")
        for n, branch in enumerate(branches):
            self.emit(depth, f"{'if' if n == 0 else 'elif'} b == {2 * n}:")
            self.value(branch, into, depth + 1)

    def array(self, schema: dict[str, Any], into: str, depth: int) -> None:
        if "items" not in schema:
            raise Unsupported("an array without items")
        least = self.least_size(schema["items"], set())
        if least == 0:
            raise Unsupported("array items that can be zero bytes long")
        item = self.fresh("v")
        self.blocks(into, "[]", least, depth)
        self.value(schema["items"], item, depth + 2)
        self.emit(depth + 2, f"{into}.append({item})")
        self.block_end(into, least, depth)

    def map(self, schema: dict[str, Any], into: str, depth: int) -> None:
        if "values" not in schema:
            raise Unsupported("a map without values")
        key, item = self.fresh("v"), self.fresh("v")
        self.blocks(into, "{}", 1, depth)  # every entry has a key, at least its length byte
        self.primitive("string", {}, key, depth + 2)
        self.value(schema["values"], item, depth + 2)
        self.emit(depth + 2, f"{into}[{key}] = {item}")
        self.block_end(into, 1, depth)

    def blocks(self, into: str, empty: str, least: int, depth: int) -> None:
        count = f"c{into}"
        self.emit(depth, f"{into} = {empty}")
        self.emit(depth, f"{count}, pos = block_(buf, pos, {self.const(least)})")
        self.emit(depth, f"while {count}:")
        self.emit(depth + 1, f"for _ in range_({count}):")

    def block_end(self, into: str, least: int, depth: int) -> None:
        self.emit(depth + 1, f"c{into}, pos = block_(buf, pos, {self.const(least)})")

    def least_size(self, schema: Any, seen: set[str]) -> int:
        """The fewest bytes a value of this schema can be encoded in."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return 1
        if isinstance(schema, dict):
            kind = schema.get("type")
            if isinstance(kind, (dict, list)):
                return self.least_size(kind, seen)
        else:
            kind = schema
        if kind == "fixed":
            size = schema.get("size")
            return size if type(size) is int and size > 0 else 0
        if kind in ("record", "error"):
            name = schema.get("name")
            fields = schema.get("fields")
            if name in seen or not isinstance(fields, list):
                raise Unsupported("a type that contains itself")
            inner = seen | {name}
            return sum(
                self.least_size(f.get("type"), inner) if isinstance(f, dict) else 0 for f in fields
            )
        return _LEAST_SIZES.get(kind, 1)
