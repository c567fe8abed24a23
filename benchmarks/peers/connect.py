"""Kafka Connect in standalone mode with Debezium's JDBC sink connector, as a local process.

The jars come from Maven Central on first use (`jdbc-sink.pom.xml`, resolved with
`maven-settings.xml` into ~/.cache/cdc-sink/peers, or $CDC_PEERS_CACHE), with the Kafka version
of the local stack. The property files are made by pure functions; `ConnectProcess` is the thin
part that starts the JVM, reads its task's state over Connect's REST API (bound to 127.0.0.1 on
a free port) and its CPU time and peak resident set from /proc, and stops it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx2 as httpx

PEERS = Path(__file__).resolve().parent
POM = PEERS / "jdbc-sink.pom.xml"
MAVEN_SETTINGS = PEERS / "maven-settings.xml"
sys.path.insert(0, str(PEERS.parents[1] / "deploy" / "local"))

import stack  # noqa: E402 - deploy/local/stack.py: the stack's Java and Maven helpers

CACHE = Path(os.environ.get("CDC_PEERS_CACHE") or Path.home() / ".cache" / "cdc-sink" / "peers")
CONNECTOR_CLASS = "io.debezium.connector.jdbc.JdbcSinkConnector"
# What bin/connect-standalone.sh of the Kafka distribution gives the JVM.
JVM_OPTIONS = (
    "-Xms256M",
    "-Xmx2G",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    "-Duser.timezone=UTC",
)
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = %d{ISO8601} %p [%t] %c{1} - %m%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
"""


def pom_property(name: str, pom: str | None = None) -> str:
    """A <properties> value of the connector's POM (its Kafka and Debezium versions)."""
    text = POM.read_text() if pom is None else pom
    found = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", text)
    if not found:
        raise ValueError(f"{POM.name} sets no {name}")
    return found.group(1).strip()


def home() -> Path:
    """Where the jars go: one folder per Debezium and Kafka version."""
    debezium, kafka = pom_property("debezium.version"), pom_property("kafka.version")
    return CACHE / f"debezium-jdbc-{debezium}-connect-{kafka}"


def fetch_jars() -> Path:
    """The runtime classpath folder, resolved from Maven Central the first time."""
    stack.maven_copy_dependencies(POM, home(), settings=MAVEN_SETTINGS)
    return home() / "lib"


def _properties(values: Mapping[str, object]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


def property_value(properties: str, key: str) -> str:
    """One key's value in a .properties text made by this module."""
    found = re.search(rf"^{re.escape(key)}=(.*)$", properties, re.MULTILINE)
    if not found:
        raise ValueError(f"no {key} in the properties")
    return found.group(1)


def worker_properties(bootstrap: str, offsets_file: Path, rest_port: int) -> str:
    """A standalone worker: JsonConverter with schemas for keys and values, the REST API on
    loopback, offsets flushed every 500 ms (their commit is how the harness sees the end), and
    polls of 1,000 records, the connector's batch size."""
    return _properties(
        {
            "bootstrap.servers": bootstrap,
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "true",
            "value.converter.schemas.enable": "true",
            "offset.storage.file.filename": offsets_file,
            "offset.flush.interval.ms": 500,
            "listeners": f"http://127.0.0.1:{rest_port}",
            "consumer.max.poll.records": 1000,
            "consumer.auto.offset.reset": "earliest",
            # Scanning the classpath by reflection takes half a minute here; every plugin used
            # has a ServiceLoader manifest.
            "plugin.discovery": "service_load",
        }
    )


def jdbc_login(dsn: str) -> tuple[str, str, str]:
    """(JDBC URL, user, password) of a postgresql:// DSN."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ValueError("not a postgresql:// DSN with a host")
    port = f":{parts.port}" if parts.port else ""
    url = f"jdbc:postgresql://{parts.hostname}{port}{parts.path or '/'}"
    return url, unquote(parts.username or ""), unquote(parts.password or "")


def connector_properties(
    name: str, topics: list[str], dsn: str, schema: str, *, reduction_buffer: bool
) -> str:
    """One task, upsert, deletes on, the primary key from the record key, tables created from
    the records' schemas in `schema` (named after their topics), batches of 1,000."""
    url, user, password = jdbc_login(dsn)
    return _properties(
        {
            "name": name,
            "connector.class": CONNECTOR_CLASS,
            "tasks.max": 1,
            "topics": ",".join(topics),
            "connection.url": url,
            "connection.username": user,
            "connection.password": password,
            "insert.mode": "upsert",
            "delete.enabled": "true",
            "primary.key.mode": "record_key",
            "schema.evolution": "basic",
            "batch.size": 1000,
            "collection.name.format": f"{schema}.${{topic}}",
            "use.reduction.buffer": str(reduction_buffer).lower(),
        }
    )


class ConnectError(Exception):
    """Kafka Connect or its task did not start, or the task failed; the message says why."""


class ConnectProcess:
    """One Kafka Connect standalone JVM running one connector, in its own work folder."""

    def __init__(
        self, work: Path, bootstrap: str, connector: str, rest_port: int, log_path: Path
    ) -> None:
        """`connector` is the connector's properties; the worker's REST API listens on
        127.0.0.1:`rest_port`."""
        self.work = work
        self.log_path = log_path
        self.rest = f"http://127.0.0.1:{rest_port}"
        work.mkdir(parents=True, exist_ok=True)
        worker = worker_properties(bootstrap, work / "offsets", rest_port)
        (work / "worker.properties").write_text(worker)
        (work / "connector.properties").write_text(connector)
        (work / "log4j2.properties").write_text(LOG4J2)
        self.name = property_value(connector, "name")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, lib: Path) -> int:
        """Start the JVM; return its pid."""
        command = [
            stack.java17(),
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.work / 'log4j2.properties'}",
            "-cp",
            f"{lib}/*",
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(self.work / "worker.properties"),
            str(self.work / "connector.properties"),
        ]
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        return self.process.pid

    def task_state(self) -> tuple[str, str]:
        """(state, trace) of the connector's task: UNASSIGNED before it exists, EXITED when the
        JVM is gone."""
        if self.process is None or self.process.poll() is not None:
            return "EXITED", self.log_tail()
        try:
            response = httpx.get(f"{self.rest}/connectors/{self.name}/status", timeout=2)
        except httpx.HTTPError:
            return "UNASSIGNED", ""
        if response.status_code != 200:
            return "UNASSIGNED", ""
        tasks = response.json().get("tasks") or [{}]
        return tasks[0].get("state", "UNASSIGNED"), tasks[0].get("trace", "")

    def wait_running(self, timeout_s: float = 300) -> None:
        """Until the task runs; ConnectError if it failed, the JVM exited or time ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state, trace = self.task_state()
            if state == "RUNNING":
                return
            if state in ("FAILED", "EXITED"):
                raise ConnectError(f"the connector's task is {state}: {root_cause(trace)}")
            time.sleep(0.1)
        raise ConnectError(f"the connector's task did not start within {timeout_s:.0f} s")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; nothing if it is not running."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def root_cause(trace: str) -> str:
    """The innermost exception of a Java stack trace (its last "Caused by:"), or its first
    line when it has none."""
    lines = [line.strip() for line in trace.strip().splitlines()]
    causes = [line.removeprefix("Caused by: ") for line in lines if line.startswith("Caused by:")]
    return causes[-1] if causes else (lines[0] if lines else "")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for pid {pid}")
