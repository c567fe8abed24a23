"""cdc-sink: applies Debezium Cassandra change events from Kafka to PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cdc-sink")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
