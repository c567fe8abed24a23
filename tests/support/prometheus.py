"""Prometheus for tests: the stack's, to which a test registers its workers (job "cdc-sink",
through the stack's targets directory), or one of a test's own: Debian's binary, the
repository's rule files, scraping the workers the test started and the stack's Pushgateway
every second.

The stack's Prometheus loads the rules of the checkout that started the stack; a private one
evaluates this checkout's rules, for tests of the rules themselves."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.alerting import RULES_DIR, debian_tool
from tests.support.stack import Endpoints

SCRAPE_SECONDS = 1.0
STACK_SCRAPE_SECONDS = 2.0  # how often the stack's Prometheus scrapes job cdc-sink


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def capture_jobs(stack: Endpoints) -> dict[str, str]:
    """The scrape jobs of the capture side: the Debezium agent's JMX exporter and the use of
    Cassandra's cdc_raw, as the stack serves them; the test fails if the stack does not."""
    jobs = {
        "debezium-agent": stack.get("CDC_STACK_DEBEZIUM_METRICS"),
        "cassandra-cdc": stack.get("CDC_STACK_CDC_RAW_METRICS"),
    }
    missing = [job for job, target in jobs.items() if not target]
    if missing:
        pytest.fail(
            f"the stack serves no metrics for {missing} (CDC_STACK_DEBEZIUM_METRICS, "
            "CDC_STACK_CDC_RAW_METRICS): restart its debezium and start its cdc-raw-exporter",
            pytrace=False,
        )
    return {job: str(target) for job, target in jobs.items()}


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # Prometheus says what is wrong with a query
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector `expression` gives now (or at unix time `at`)."""
        params = {"query": expression} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self._get("/api/v1/query", **params)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The pending or firing alerts of rule `name`."""
        found: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return [alert for alert in found if alert["labels"].get("alertname") == name]

    def config(self) -> str:
        """The configuration it runs with (YAML)."""
        loaded: str = self._get("/api/v1/status/config")["yaml"]
        return loaded

    def wait_scraped(
        self, targets: int, timeout: float = 60, job: str = "cdc-sink", matchers: str = ""
    ) -> None:
        """Wait until `targets` targets of `job` (and of `matchers`, e.g. `, run="x"`) are up."""
        selector = f'up{{job="{job}"{matchers}}}'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.query(f"{selector} == 1")) >= targets:
                return
            time.sleep(SCRAPE_SECONDS)
        raise AssertionError(f"Prometheus has not scraped {targets} of {selector}")


@contextmanager
def registered_workers(
    stack: Endpoints, name: str, workers: Sequence[str], labels: Mapping[str, str]
) -> Iterator[Prometheus]:
    """The stack's Prometheus, scraping `workers` (host:port of each worker's /metrics) as
    job cdc-sink with `labels` on their series until the block ends: they are registered in a
    file `name`.json of the stack's targets directory. Fails the test if that Prometheus does
    not read the directory (it was started before it did: `deploy/local/stack restart
    prometheus`)."""
    directory, prometheus = (
        stack.get("CDC_STACK_PROMETHEUS_TARGETS"),
        Prometheus(stack["CDC_PROMETHEUS__URL"]),
    )
    if not directory or directory not in prometheus.config():
        pytest.fail(
            f"the stack's Prometheus does not read its targets directory {directory}: "
            "restart it (deploy/local/stack restart prometheus)",
            pytrace=False,
        )
    path = Path(directory) / f"{name}.json"
    staged = path.with_suffix(".staged")  # not *.json: Prometheus never reads half a file
    staged.write_text(json.dumps([{"targets": list(workers), "labels": dict(labels)}]))
    staged.replace(path)
    try:
        yield prometheus
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def private_prometheus(
    workers: Sequence[str],
    pushgateway_url: str,
    directory: Path,
    more_jobs: Mapping[str, str] | None = None,
) -> Iterator[Prometheus]:
    """Run Prometheus on a free loopback port until the block ends, scraping `workers`
    (host:port of each worker's /metrics), the Pushgateway and `more_jobs` (job name: host:port),
    evaluating every rule file of deploy/prometheus/rules each second."""
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS:g}s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_DIR / "*.yml")],
        "scrape_configs": [
            {"job_name": "cdc-sink", "static_configs": [{"targets": list(workers)}]},
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "static_configs": [{"targets": [urllib.parse.urlsplit(pushgateway_url).netloc]}],
            },
            *(
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in (more_jobs or {}).items()
            ),
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                debian_tool("prometheus", "prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (directory / "prometheus.log").read_text()
                    raise AssertionError(f"Prometheus did not start:\n{log_text}") from None
                time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
