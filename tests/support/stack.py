"""Where the test suite finds the real services.

Three backends, chosen with CDC_TEST_STACK:
- `local` (default): `deploy/local/stack up` — starts the services from Maven Central jars,
  Debian and PyPI on loopback, or reuses the ones already running.
- `external`: the CDC_* variables already in the environment point at running services.
- `docker`: testcontainers starts the services, for machines with a Docker engine.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "deploy" / "local" / "stack"

REQUIRED = (
    "CDC_KAFKA__BOOTSTRAP_SERVERS",
    "CDC_POSTGRES__DSN",
    "CDC_CASSANDRA__CONTACT_POINTS",
    "CDC_CASSANDRA__PORT",
    "CDC_SCHEMA_REGISTRY__URL",
    "CDC_VAULT__ADDR",
    "CDC_VAULT__TOKEN",
    "CDC_PUSHGATEWAY__URL",
    "CDC_PROMETHEUS__URL",
)


class StackUnavailable(RuntimeError):
    """The services could not be started or found; the message says which and why."""


@dataclass(frozen=True)
class Endpoints:
    """Addresses of the real services, as the CDC_* settings cdc-sink reads."""

    values: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    @property
    def kafka(self) -> str:
        return self.values["CDC_KAFKA__BOOTSTRAP_SERVERS"]

    @property
    def postgres_dsn(self) -> str:
        return self.values["CDC_POSTGRES__DSN"]

    @property
    def cassandra_host(self) -> str:
        return self.values["CDC_CASSANDRA__CONTACT_POINTS"].split(",")[0]

    @property
    def cassandra_port(self) -> int:
        return int(self.values["CDC_CASSANDRA__PORT"])

    @property
    def schema_registry_url(self) -> str:
        return self.values["CDC_SCHEMA_REGISTRY__URL"]

    @property
    def vault_addr(self) -> str:
        return self.values["CDC_VAULT__ADDR"]

    @property
    def vault_token(self) -> str:
        return self.values["CDC_VAULT__TOKEN"]

    @property
    def nodetool(self) -> list[str]:
        """The command prefix that runs Cassandra's nodetool against the node."""
        return json.loads(self.values.get("CDC_TEST_NODETOOL", "null")) or [str(STACK), "nodetool"]

    @property
    def pushgateway_url(self) -> str:
        return self.values["CDC_PUSHGATEWAY__URL"]

    @property
    def prometheus_url(self) -> str:
        return self.values["CDC_PROMETHEUS__URL"]


def local_stack() -> Endpoints:
    """Start (or reuse) the loopback stack and return its endpoints."""
    up = subprocess.run([str(STACK), "up"], capture_output=True, text=True, timeout=1800)
    if up.returncode != 0:
        raise StackUnavailable(f"`deploy/local/stack up` failed:\n{up.stdout}\n{up.stderr}")
    env = subprocess.run(
        [str(STACK), "env", "--json"], capture_output=True, text=True, check=True, timeout=60
    )
    return Endpoints(json.loads(env.stdout))


def external_stack() -> Endpoints:
    missing = [key for key in REQUIRED if not os.environ.get(key)]
    if missing:
        raise StackUnavailable(f"CDC_TEST_STACK=external but unset: {', '.join(missing)}")
    return Endpoints({k: v for k, v in os.environ.items() if k.startswith("CDC_")})


def find_stack() -> Endpoints:
    backend = os.environ.get("CDC_TEST_STACK", "local")
    if backend == "local":
        return local_stack()
    if backend == "external":
        return external_stack()
    if backend == "docker":
        from tests.support.docker_stack import docker_stack

        return docker_stack()
    raise StackUnavailable(f"CDC_TEST_STACK={backend!r}: choose local, external or docker")


def stack_command(stack: Endpoints, *args: str) -> None:
    """Run deploy/local/stack on the stack the tests use (its home and port offset)."""
    if not stack.get("CDC_STACK_HOME"):
        raise StackUnavailable(
            "this test needs a stack deploy/local/stack controls (CDC_STACK_HOME)"
        )
    env = {
        **os.environ,
        "CDC_STACK_HOME": stack["CDC_STACK_HOME"],
        "CDC_STACK_PORT_OFFSET": stack.get("CDC_STACK_PORT_OFFSET") or "0",
    }
    done = subprocess.run(
        [str(STACK), *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"stack {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
