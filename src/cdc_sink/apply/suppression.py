"""Suppression: a key erased for GDPR is never written again, whoever brings it back.

Erased keys live in `_cdc_erased_keys` as their `key_hash`, scope `row` (one row's full key) or
`partition` (every row of a partition key). Change events, DLQ replays (they come back through
the topic) and reconciliation repairs all reach PostgreSQL through `PgWriter`, which reads the
newest entry id of each table it writes (`version`) in a statement it runs anyway, under the
batch's partition locks: an erasure takes the same lock, so a batch either commits before it
(and is erased with the rest) or sees its entry. Dead letters of erased keys are skipped the
same way, before they are produced and again before they are stored (`PgWriter.erased_letters`).

Entries are never removed, so a table's are loaded once and then only those above the version
known: a batch of a table with erasures costs one HMAC per distinct key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from cdc_sink.config import Secret
from cdc_sink.errors import FatalError, SinkError
from cdc_sink.model.events import Key
from cdc_sink.schema.tables import TableSchema

ROW = "row"
PARTITION = "partition"


def key_hash(hash_key: Secret, target: str, scope: str, key_text: str) -> bytes:
    """The HMAC-SHA-256 an erased key is kept as: of the target table, the scope and the key's
    canonical JSON text, so equal keys of two tables do not share a hash."""
    message = "\x00".join((target, scope, key_text)).encode()
    return hmac.new(hash_key.reveal().encode(), message, hashlib.sha256).digest()


def by_value(key: Key) -> Key:
    """A key's values in the one form PostgreSQL's equality gives them (12.340 is 12.34, -0.0 is
    0.0): an erased key is hashed from this form, as reconciliation, which knows keys only by
    value, must find it too (and PostgreSQL holds one row for both)."""
    return tuple(_by_value(v) for v in key)


def _by_value(v: Any) -> Any:
    if isinstance(v, Decimal) and v.is_finite():
        # Plain digits, as json_key rendered every key without trailing zeros before.
        return Decimal(0) if v.is_zero() else Decimal(format(v.normalize(), "f"))
    if isinstance(v, float) and v == 0.0:
        return 0.0
    return v


def record_key(schema: TableSchema, fields: Any) -> Key | None:
    """A decoded record key as the PostgreSQL values of `schema`'s key columns (None in the
    clustering columns of a partition or range delete), as erasure and suppression compare
    keys; None if its fields are not exactly the table's key columns or a value does not fit."""
    if not isinstance(fields, Mapping) or set(fields) != set(schema.key_columns):
        return None
    try:
        return tuple(
            None if fields[c] is None else schema.converters[c](fields[c])
            for c in schema.key_columns
        )
    except (SinkError, ValueError, TypeError):
        return None


@dataclass
class _Erased:
    version: int = 0
    hashes: set[tuple[str, bytes]] = field(default_factory=set)  # (scope, hash)


class Suppression:
    """What the writers of one process know of the erased keys, per target table."""

    def __init__(self, hash_key: Secret | None) -> None:
        self._hash_key = hash_key
        self._tables: dict[str, _Erased] = {}

    async def erased(
        self,
        conn: asyncpg.Connection,
        target: str,
        keys: Sequence[Key],
        text_of: Callable[[Key], str],
        partition_columns: Sequence[str] | None,
        version: int | None = None,
    ) -> set[Key]:
        """Those of `keys` (full keys; None in the clustering columns of a partition or range
        delete) that an erasure covers: the row's own, or its partition's. `version` is the
        newest `_cdc_erased_keys` id of `target` (the writer reads it under the batch's locks);
        None reads it. FatalError if the table has erased keys and no hash key is configured
        (writing blindly could bring an erased person back)."""
        if version is None:
            version = await conn.fetchval(
                "SELECT coalesce(max(id), 0) FROM _cdc_erased_keys WHERE target_table = $1",
                target,
            )
        if not version or not keys:
            return set()
        hash_key = self._hash_key
        if hash_key is None:
            raise FatalError(
                f"{target} has erased keys (_cdc_erased_keys) and CDC_GDPR__HASH_KEY is not set: "
                "the sink cannot tell them apart and writes none of its rows",
                stage="write",
            )
        erased = self._tables.setdefault(target, _Erased())
        if erased.version < version:
            rows = await conn.fetch(
                "SELECT scope, key_hash FROM _cdc_erased_keys "
                "WHERE target_table = $1 AND id > $2 AND id <= $3",
                target,
                erased.version,
                version,
            )
            erased.hashes.update((r["scope"], bytes(r["key_hash"])) for r in rows)
            erased.version = version
        width = len(partition_columns) if partition_columns else None

        @functools.cache  # a partition's rows share its verdict
        def covered(scope: str, key: Key) -> bool:
            digest = key_hash(hash_key, target, scope, text_of(by_value(key)))
            return (scope, digest) in erased.hashes

        return {
            key
            for key in set(keys)
            if (None not in key and covered(ROW, key))
            or (width is not None and covered(PARTITION, key[:width]))
        }
