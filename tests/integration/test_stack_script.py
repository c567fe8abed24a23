"""deploy/local/stack itself: endpoints, loopback-only binding, and its refusal paths."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import REQUIRED, STACK, Endpoints

pytestmark = pytest.mark.skipif(
    os.environ.get("CDC_TEST_STACK", "local") != "local",
    reason="checks the processes deploy/local/stack runs on this machine",
)


def run_stack(
    *args: str, home: Path | None = None, offset: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"CDC_STACK_HOME": str(home)} if home else {})}
    if offset is not None:
        env["CDC_STACK_PORT_OFFSET"] = str(offset)
    return subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def service_pids(home: Path) -> dict[str, int]:
    return {
        pid_file.parent.name: int(pid_file.read_text()) for pid_file in (home / "run").glob("*/pid")
    }


def test_env_exports_every_endpoint_on_loopback(stack: Endpoints) -> None:
    """`env` prints an export line for every required setting, all pointing at 127.0.0.1."""
    done = run_stack("env")
    exported = dict(re.findall(r"^export (\w+)='(.*)'$", done.stdout, flags=re.MULTILINE))
    assert set(REQUIRED) <= set(exported)
    for key in REQUIRED:
        if key not in ("CDC_VAULT__TOKEN", "CDC_CASSANDRA__PORT"):
            assert "127.0.0.1" in exported[key], key


def test_status_reports_every_service_up(stack: Endpoints) -> None:
    """`status` lists each service as up with its loopback address and exits 0."""
    done = run_stack("status")
    assert done.returncode == 0, done.stdout
    for name in (
        "postgres",
        "openbao",
        "kafka",
        "cassandra",
        "schema-registry",
        "prometheus",
        "pushgateway",
        "alertmanager",
        "debezium",
        "cdc-raw-exporter",
    ):
        assert re.search(rf"^{name}\s+up\s+127\.0\.0\.1:\d+", done.stdout, re.MULTILINE), name


def test_services_listen_on_loopback_only(stack: Endpoints) -> None:
    """No socket of any service the stack started listens beyond 127.0.0.1."""
    home = Path(stack["CDC_STACK_HOME"])
    pids = set(service_pids(home).values())
    assert len(pids) == 10
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    seen = 0
    for line in listening.stdout.splitlines():
        owner = re.search(r"pid=(\d+)", line)
        if not owner or not _in_groups(int(owner.group(1)), pids):
            continue
        seen += 1
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line
    assert seen >= 11  # the Debezium agent's JMX exporter is a listener of its own


def _in_groups(pid: int, group_leaders: set[int]) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return False
    return int(stat[2]) in group_leaders


def test_up_refuses_a_port_it_did_not_claim(stack: Endpoints, tmp_path: Path) -> None:
    """A second stack home cannot start over a busy port: it names the service and exits 1."""
    other_home = tmp_path / "other-stack"
    done = run_stack("up", "pushgateway", home=other_home)
    assert done.returncode == 1
    assert "pushgateway" in done.stdout
    assert "already used by a process this stack did not start" in done.stdout
    assert service_pids(other_home) == {}


def test_unknown_service_is_a_usage_error() -> None:
    """Naming a service the stack does not have fails before anything starts."""
    done = run_stack("up", "zookeeper")
    assert done.returncode == 2
    assert "unknown service zookeeper" in done.stderr


def test_logs_shows_the_tail_of_the_service_log(stack: Endpoints) -> None:
    """`logs kafka -n 20` prints the last 20 lines of the broker's own log file."""
    log_file = Path(stack["CDC_STACK_HOME"]) / "run" / "kafka" / "service.log"
    done = run_stack("logs", "kafka", "-n", "20")
    assert done.returncode == 0
    shown = done.stdout.splitlines()
    assert len(shown) == 20
    assert shown == log_file.read_text(errors="replace").splitlines()[-20:]
    assert "starting:" in log_file.read_text(errors="replace")


def test_a_second_stack_with_a_port_offset_runs_beside_the_first(tmp_path: Path) -> None:
    """CDC_STACK_PORT_OFFSET shifts every port: a second home starts its own Pushgateway on
    the shifted port, `env` prints shifted endpoints, and `down --immediate` stops it."""
    home, offset = tmp_path / "second", 2000
    try:
        done = run_stack("up", "pushgateway", home=home, offset=offset)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ready at 127.0.0.1:21091" in done.stdout
        exported = run_stack("env", home=home, offset=offset).stdout
        assert "CDC_KAFKA__BOOTSTRAP_SERVERS='127.0.0.1:21092'" in exported
        assert "CDC_POSTGRES__DSN='postgresql://cdc_sink:cdc_sink@127.0.0.1:17432/cdc'" in exported
        assert "CDC_STACK_PORT_OFFSET='2000'" in exported
        stopped = run_stack("down", "--immediate", "pushgateway", home=home, offset=offset)
        assert "pushgateway: stopped (immediate)" in stopped.stdout
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", 21091)) != 0  # nothing listens any more
    finally:
        run_stack("down", home=home, offset=offset)
