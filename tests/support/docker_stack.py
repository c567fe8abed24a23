"""The same services as deploy/local/stack, from container images, for hosts with Docker.

Selected with CDC_TEST_STACK=docker. The containers live as long as the test session (the
testcontainers reaper removes them). Versions match the local stack.
"""

from __future__ import annotations

import atexit
import json
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

from tests.support.stack import Endpoints, StackUnavailable

with warnings.catch_warnings():
    # testcontainers' modules use their own deprecated decorators at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from testcontainers.community.cassandra import CassandraContainer
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.vault import VaultContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

VAULT_TOKEN = "cdc-test-root-token"
PROMETHEUS_CONFIG = """
global: {scrape_interval: 2s}
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{targets: ["pushgateway:9091"]}]
"""


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(1)
    raise StackUnavailable(f"{url} did not answer within {timeout:.0f}s")


def docker_stack() -> Endpoints:
    """Start every service in containers on one network and return their endpoints."""
    network = Network().create()
    cdc_raw = Path(tempfile.mkdtemp(prefix="cdc-raw-"))
    cdc_raw.chmod(0o777)
    prometheus_yml = Path(tempfile.mkdtemp(prefix="prom-")) / "prometheus.yml"
    prometheus_yml.write_text(PROMETHEUS_CONFIG)
    prometheus_yml.parent.chmod(0o755)

    kafka = KafkaContainer("confluentinc/cp-kafka:7.8.0").with_kraft()
    postgres = (
        PostgresContainer("postgres:15", username="cdc_sink", password="cdc_sink", dbname="cdc")
        .with_network(network)
        .with_network_aliases("postgres")  # Vault's database engine connects to it there
    )
    cassandra = (
        CassandraContainer("cassandra:5.0")
        .with_volume_mapping(str(cdc_raw), "/var/lib/cassandra/cdc_raw", mode="rw")
        .with_command(
            [
                "bash",
                "-c",
                "sed -i 's/^cdc_enabled: false/cdc_enabled: true/' /etc/cassandra/cassandra.yaml"
                " && exec docker-entrypoint.sh cassandra -f",
            ]
        )
    )
    vault = VaultContainer("openbao/openbao:2.4.1", root_token=VAULT_TOKEN).with_network(network)
    registry = DockerContainer("apicurio/apicurio-registry:3.3.3").with_exposed_ports(8080)
    pushgateway = (
        DockerContainer("prom/pushgateway:v1.11.0")
        .with_exposed_ports(9091)
        .with_network(network)
        .with_network_aliases("pushgateway")
    )
    prometheus = (
        DockerContainer("prom/prometheus:v3.5.0")
        .with_exposed_ports(9090)
        .with_network(network)
        .with_volume_mapping(str(prometheus_yml), "/etc/prometheus/prometheus.yml")
    )
    containers = [kafka, postgres, cassandra, vault, registry, pushgateway, prometheus]
    for container in containers:
        container.start()
        atexit.register(container.stop)
    atexit.register(network.remove)

    def url(container: DockerContainer, port: int) -> str:
        return f"http://{container.get_container_host_ip()}:{container.get_exposed_port(port)}"

    registry_url = url(registry, 8080) + "/apis/ccompat/v7"
    _wait_http(registry_url + "/subjects")
    _wait_http(url(prometheus, 9090) + "/-/ready")
    host, port = cassandra.get_contact_points()[0]
    container_id = cassandra.get_wrapped_container().id
    return Endpoints(
        {
            "CDC_KAFKA__BOOTSTRAP_SERVERS": kafka.get_bootstrap_server(),
            "CDC_POSTGRES__DSN": postgres.get_connection_url(driver=None),
            # the image's user is a superuser
            "CDC_STACK_POSTGRES_ADMIN_DSN": postgres.get_connection_url(driver=None),
            "CDC_STACK_POSTGRES_FROM_VAULT": "postgres:5432",
            "CDC_CASSANDRA__CONTACT_POINTS": host,
            "CDC_CASSANDRA__PORT": str(port),
            "CDC_CASSANDRA__LOCAL_DC": cassandra.get_local_datacenter(),
            "CDC_STACK_CASSANDRA_CDC_RAW": str(cdc_raw),
            "CDC_SCHEMA_REGISTRY__URL": registry_url,
            "CDC_VAULT__ADDR": vault.get_connection_url(),
            "CDC_VAULT__TOKEN": VAULT_TOKEN,
            "CDC_PUSHGATEWAY__URL": url(pushgateway, 9091),
            "CDC_PROMETHEUS__URL": url(prometheus, 9090),
            "CDC_TEST_NODETOOL": json.dumps(["docker", "exec", container_id, "nodetool"]),
        }
    )
