"""The pure core imports no I/O library; the writer's codecs choose the UUID type when asked
(no services)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, uuid
import cdc_sink.model.events, cdc_sink.apply.plan, cdc_sink.schema.tables, cdc_sink.schema.direct
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.values import to_pg
u = "12345678-1234-5678-1234-567812345678"
forms = [u, u.upper(), "{" + u + "}", "urn:uuid:" + u, uuid.UUID(u).bytes]
converted = [to_pg(parse_cql_type("uuid"), form) for form in forms]
io = {"asyncpg", "aiokafka", "httpx", "cassandra", "hvac"} & {m.split(".")[0] for m in sys.modules}
before = [type(c).__module__ + "." + type(c).__name__ for c in converted]
import cdc_sink.apply.codecs
imported = type(to_pg(parse_cql_type("uuid"), u))
cdc_sink.apply.codecs.use_asyncpg_uuids()
after = type(to_pg(parse_cql_type("uuid"), u))
print(json.dumps({"io": sorted(io), "equal": all(c == uuid.UUID(u) for c in converted),
                  "before": sorted(set(before)), "imported": imported.__module__,
                  "after": after.__module__}))
"""


def test_the_core_imports_no_io_library_and_codecs_install_asyncpgs_uuid_when_asked() -> None:
    """Importing the model, plan and tables loads no driver, their UUIDs are uuid.UUID in every
    accepted form; importing the codecs changes nothing, use_asyncpg_uuids switches them to
    asyncpg's UUID type."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    found = json.loads(done.stdout)
    assert found["io"] == []
    assert found["equal"] is True
    assert found["before"] == ["uuid.UUID"]
    assert found["imported"] == "uuid"
    assert found["after"].startswith("asyncpg.")
