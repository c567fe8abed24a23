"""The container image (deploy/container): built as `make image` builds it, run with podman on the
host network against the stack, as a non-root user on a read-only root filesystem with no
writable path and no capabilities."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cassandra_model import COLUMNS, Row, expected_rows, replica_streams
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    produce,
    random_history,
    read_rows,
    schemaless_record,
    sink_env,
)
from tests.support.stack import REPO, Endpoints
from tests.support.topics import unique_name

# What the build script and the README give every podman command on these machines.
PODMAN_FLAGS = [
    "--runtime", "runc", "--network", "host",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
]  # fmt: skip
# The posture of a hardened pod: nothing on the root filesystem is writable (not even /tmp),
# no capabilities, no privilege escalation; the image's own user (checked below).
HARDENED = [
    "--read-only", "--read-only-tmpfs=false",
    "--cap-drop=all", "--security-opt=no-new-privileges",
    "--health-interval=disable",  # no systemd timer here: the test runs the check itself
]  # fmt: skip
SHUTDOWN_TIMEOUT_S = 20


@dataclass(frozen=True)
class Stream:
    records: list[tuple[bytes, bytes]]
    expected: dict[tuple[object, ...], Row]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built from this checkout by deploy/container/build (the Debian base is made
    once and kept; unchanged layers come from podman's cache); removed at the end."""
    tag = f"localhost/{unique_name('cdc-sink-test')}:latest"
    started = time.monotonic()
    built = subprocess.run(
        [REPO / "deploy" / "container" / "build", tag],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    size = json.loads(podman("image", "inspect", tag).stdout)[0]["Size"]
    print(f"image built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    yield tag
    podman("rmi", "--force", tag)


def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"podman {args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def remove_container(name: str) -> None:
    """Remove the container, killing it at once if it still runs."""
    subprocess.run(["podman", "rm", "--force", "--time=0", name], capture_output=True, check=False)


def run_options(env: dict[str, str], env_file: Path) -> list[str]:
    """`podman run` options for the image in the hardened posture, configured only through
    `env` (an env file: the DSN's password stays off the command line)."""
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    return [*PODMAN_FLAGS, *HARDENED, f"--env-file={env_file}"]


async def run_container(image: str, options: list[str], *args: str) -> tuple[str, str]:
    """Run the image's entrypoint with `args` to its end; it must exit 0. Its stdout, stderr."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["podman", "run", "--rm", *options, image, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout, done.stderr


def make_stream(stack: Endpoints, keyspace: str, mutations: int) -> Stream:
    """Three replica copies of a random history over the model table, and Cassandra's rows."""
    rng = random.Random(keyspace)
    history = random_history(rng, mutations, keys=1_500, base_ts=1_900_000_000_000_000)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    create_cassandra_model_table(stack, keyspace)
    records = [schemaless_record(m, keyspace) for m in deliveries]
    return Stream(records, expected_rows(history))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_image_runs_as_a_non_root_user_with_labels_and_a_healthcheck(image: str) -> None:
    """The image's user is numeric and not root, its entrypoint is `python -m cdc_sink`, it
    carries the OCI labels and a HEALTHCHECK on /health, and its Python satisfies pyproject."""
    [config] = json.loads(podman("image", "inspect", image).stdout)
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["python", "-m", "cdc_sink"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "cdc-sink"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert len(labels["org.opencontainers.image.revision"]) == 40
    assert labels["org.opencontainers.image.base.name"] == "localhost/cdc-sink-base:bookworm"
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    version, _ = await run_container(image, [*PODMAN_FLAGS, *HARDENED], "version")
    assert version.startswith("cdc-sink 0.1.0 (Python 3.11.")


def test_the_healthcheck_fails_when_nothing_answers_on_the_probes_port(image: str) -> None:
    """With no worker listening on CDC_HTTP__PORT, the image's HEALTHCHECK reports unhealthy."""
    name = unique_name("cdc-sink-idle")
    podman(
        "run", "--detach", f"--name={name}", *PODMAN_FLAGS, *HARDENED,
        f"--env=CDC_HTTP__PORT={free_port()}", "--entrypoint=sleep", image, "120",
    )  # fmt: skip
    try:
        check = subprocess.run(
            ["podman", "healthcheck", "run", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode != 0
        assert "unhealthy" in check.stdout + check.stderr
    finally:
        remove_container(name)


async def test_the_container_migrates_and_drains_a_stream_exactly(
    image: str, stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """`migrate`, then `run --stop-when-caught-up` in the container: it exits 0 with every
    offset applied once and exactly the rows Cassandra's SELECT returns."""
    stream = make_stream(stack, unique.keyspace("image"), 4_000)
    topic, schema = unique("cdc-events-image"), unique.schema("image")
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records)
    options = run_options(
        sink_env(stack, topic=topic, group=unique("g"), schema=schema), tmp_path / "env"
    )

    migrated, _ = await run_container(image, options, "migrate")
    assert "applied: 001_control_tables" in migrated
    await run_container(image, options, "run", "--stop-when-caught-up")
    assert await applied(stack.postgres_dsn, schema) == len(stream.records)
    assert await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS) == stream.expected


async def test_sigterm_during_a_drain_exits_0_within_the_shutdown_timeout(
    image: str, stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """A container draining a 60,000-event backlog, healthy by its HEALTHCHECK, gets SIGTERM
    and exits 0 within CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS with part of the backlog applied; a
    second container finishes the rest to exactly Cassandra's rows, every offset once."""
    stream = make_stream(stack, unique.keyspace("image"), 20_000)
    total = len(stream.records)
    topic, schema = unique("cdc-events-image"), unique.schema("image")
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    env.update(
        CDC_HTTP__PORT=str(free_port()),  # the HEALTHCHECK probes the port the worker binds
        CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT_S),
    )
    options = run_options(env, tmp_path / "env")
    name = unique_name("cdc-sink-drain")
    podman("run", "--detach", f"--name={name}", *options, image, "run")
    try:
        while await applied(stack.postgres_dsn, schema) == 0:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name).stderr[-3000:]
            await asyncio.sleep(0.1)
        podman("healthcheck", "run", name)  # exit 0: healthy
        podman("kill", "--signal", "TERM", name)
        signalled = time.monotonic()
        stopped = await asyncio.to_thread(podman, "wait", name, timeout=SHUTDOWN_TIMEOUT_S)
        took = time.monotonic() - signalled
        assert stopped.stdout.strip() == "0", podman("logs", name).stderr[-3000:]
        done = await applied(stack.postgres_dsn, schema)
        assert done < total, "drained before the signal"
        print(f"SIGTERM after {done} of {total} events: exit 0 {took:.1f} s later")
    finally:
        remove_container(name)

    await run_container(image, options, "run", "--stop-when-caught-up")
    assert await applied(stack.postgres_dsn, schema) == total
    assert await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS) == stream.expected
