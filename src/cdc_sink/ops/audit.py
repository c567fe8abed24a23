"""`_cdc_audit_log`: one row per state change made from the API or the command line.

A row holds the actor (a token's `sub`, `anonymous` when the API runs without authentication
on loopback, or `cli:<os user>`), the action, its arguments as JSON, and the request id bound
to the log context (the same id the request's log lines carry; the command line binds one per
command). The `audited` log line repeats them.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import asyncpg
import structlog

from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.pools import BoundedPool

log = get_logger("cdc_sink.audit")


def cli_actor() -> str:
    """The actor of a command run by hand: `cli:` and the OS user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        user = "unknown"
    return f"cli:{user}"


@contextlib.contextmanager
def command_request_id() -> Iterator[str]:
    """A new request id in the log context for the length of a command line run (unbound
    after it, so a later command in the same process gets its own)."""
    request_id = uuid.uuid4().hex
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield request_id


async def audit(
    where: asyncpg.Connection | asyncpg.Pool | BoundedPool,
    actor: str,
    action: str,
    arguments: Mapping[str, Any],
) -> None:
    """Write one audit row (inside the caller's transaction when `where` is a connection in
    one) and log it. Raises asyncpg's errors (or TransientError from a BoundedPool)."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    details = json.dumps(arguments, default=str)
    query = (
        "INSERT INTO _cdc_audit_log (actor, action, details, request_id) VALUES ($1, $2, $3, $4)"
    )
    await where.execute(query, actor, action, details, request_id)
    log.info("audited", actor=actor, action=action, arguments=dict(arguments))
