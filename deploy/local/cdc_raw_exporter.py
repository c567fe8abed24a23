"""Serves the use of Cassandra's cdc_raw directory on /metrics, for Prometheus.

Cassandra publishes no metric of it (its commit log metrics leave CDC out), yet with
`cdc_block_writes` it refuses writes to CDC tables once cdc_raw holds `cdc_total_space`, and it
is the Debezium agent's job to empty it. So this process, beside the node (a sidecar sharing the
volume in a pod), reads the directory at each scrape:

  cassandra_cdc_raw_bytes              bytes of every file in cdc_raw
  cassandra_cdc_total_space_bytes      cdc_total_space from cassandra.yaml (absent if unset)
  cassandra_cdc_raw_segments           commit log segments in cdc_raw
  cassandra_cdc_raw_completed_segments segments Cassandra has finished writing
  cassandra_cdc_raw_written_bytes      sum of the durable offsets in the segments' _cdc.idx
                                       files: grows with every synced write to a CDC table, and
                                       drops when the agent deletes a segment it has processed

Run: python cdc_raw_exporter.py --directory DIR --cassandra-yaml FILE --listen HOST:PORT
"""

from __future__ import annotations

import argparse
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric

UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def total_space(cassandra_yaml: Path) -> int | None:
    """cdc_total_space in bytes, as cassandra.yaml states it (e.g. `1024MiB`), or None."""
    found = re.search(
        r"^cdc_total_space:\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)\b", cassandra_yaml.read_text(), re.M
    )
    return int(found.group(1)) * UNITS[found.group(2)] if found else None


def _read(path: Path) -> str | None:
    """The file's text, or None if the agent deleted it meanwhile."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class CdcRawCollector:
    """Measures the directory at each collect(); files vanishing meanwhile are skipped."""

    def __init__(self, directory: Path, cassandra_yaml: Path) -> None:
        self.directory = directory
        self.cassandra_yaml = cassandra_yaml

    def collect(self) -> Iterator[Metric]:
        used = segments = completed = written = 0
        for path in self.directory.iterdir():
            try:
                used += path.stat().st_size
            except FileNotFoundError:
                continue
            if path.name.endswith(".log"):
                segments += 1
            elif path.name.endswith("_cdc.idx"):
                lines = (_read(path) or "").split()
                if lines and lines[0].isdigit():
                    written += int(lines[0])
                completed += "COMPLETED" in lines[1:]
        yield GaugeMetricFamily(
            "cassandra_cdc_raw_bytes", "Bytes of every file in cdc_raw.", value=used
        )
        space = total_space(self.cassandra_yaml)
        if space is not None:
            yield GaugeMetricFamily(
                "cassandra_cdc_total_space_bytes",
                "cdc_total_space: the size at which Cassandra refuses writes to CDC tables.",
                value=space,
            )
        yield GaugeMetricFamily(
            "cassandra_cdc_raw_segments", "Commit log segments in cdc_raw.", value=segments
        )
        yield GaugeMetricFamily(
            "cassandra_cdc_raw_completed_segments",
            "Segments in cdc_raw that Cassandra has finished writing.",
            value=completed,
        )
        yield GaugeMetricFamily(
            "cassandra_cdc_raw_written_bytes",
            "Sum of the durable offsets of the segments in cdc_raw (their _cdc.idx files).",
            value=written,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, required=True, help="Cassandra's cdc_raw")
    parser.add_argument("--cassandra-yaml", type=Path, required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT of /metrics")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    REGISTRY.register(CdcRawCollector(args.directory, args.cassandra_yaml))
    start_http_server(int(port), addr=host)
    threading.Event().wait()  # the server thread serves until the process is stopped


if __name__ == "__main__":
    main()
