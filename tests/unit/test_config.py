"""Settings: environment over file, typed and validated, secrets never shown."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cdc_recon.settings import ReconciliationConfig, reconciliation_settings
from cdc_sink.app import load_settings
from cdc_sink.config import ConfigError, load_config
from cdc_sink.ops.kafka_security import client_security


def test_defaults_match_the_documented_ones() -> None:
    """With nothing set, the documented defaults apply."""
    config = load_config({})
    assert config.kafka.topic_pattern == "^cdc-events-.*"
    assert config.sink.batch_size == 1000
    assert config.sink.table_name_format == "cdc_{table}"
    assert config.postgres.schema == "public"
    assert config.kafka.max_partition_fetch_bytes == 262_144


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    """A TOML file sets values; the same CDC_ variable overrides it."""
    file = tmp_path / "sink.toml"
    file.write_text('[kafka]\ngroup_id = "from-file"\n[sink]\nbatch_size = 500\n')
    config = load_config({"CDC_SINK__BATCH_SIZE": "250"}, file)
    assert config.kafka.group_id == "from-file"
    assert config.sink.batch_size == 250


def test_the_dsn_is_a_secret() -> None:
    """The PostgreSQL DSN never appears in a repr or str; reveal() gives it to the driver."""
    dsn = "postgresql://u:s3cret@127.0.0.1:5432/db"
    config = load_config({"CDC_POSTGRES__DSN": dsn})
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config.postgres.dsn)
    assert config.postgres.dsn.reveal() == dsn


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"CDC_KAFKA__TOPIC_PATTERN": "("}, "CDC_KAFKA__TOPIC_PATTERN"),
        ({"CDC_SINK__TABLE_NAME_FORMAT": "cdc_{nope}"}, "CDC_SINK__TABLE_NAME_FORMAT"),
        ({"CDC_SINK__BATCH_SIZE": "0"}, "CDC_SINK__BATCH_SIZE"),
        ({"CDC_POSTGRES__DSN": "mysql://x"}, "CDC_POSTGRES__DSN"),
        ({"CDC_POSTGRES__DSN": "postgresql://u:pw@h:notaport/db"}, "CDC_POSTGRES__DSN is not a"),
        ({"CDC_POSTGRES__DSN": "postgresql://u:pw@[::1/db"}, "CDC_POSTGRES__DSN is not a valid"),
        ({"CDC_POSTGRES__DSN": "postgresql://h/db?sslmode=bogus"}, "sslmode must be one of"),
        ({"CDC_POSTGRES__API_POOL_SIZE": "0"}, "CDC_POSTGRES__API_POOL_SIZE"),
        # one connection holds a job's lock: its statements need another
        ({"CDC_POSTGRES__RECONCILIATION_POOL_SIZE": "1"}, "RECONCILIATION_POOL_SIZE must be betw"),
        ({"CDC_POSTGRES__API_ACQUIRE_TIMEOUT_S": "0"}, "CDC_POSTGRES__API_ACQUIRE_TIMEOUT_S"),
        ({"CDC_HTTP__ENABLED": "perhaps"}, "CDC_HTTP__ENABLED"),
        ({"CDC_KAFKA__MAX_PARTITION_FETCH_BYTES": "10"}, "CDC_KAFKA__MAX_PARTITION_FETCH_BYTES"),
        (
            {
                "CDC_KAFKA__MAX_PARTITION_FETCH_BYTES": "2000000",
                "CDC_KAFKA__FETCH_MAX_BYTES": "1000000",
            },
            "CDC_KAFKA__MAX_PARTITION_FETCH_BYTES",
        ),
        ({"CDC_LOG__REPEAT_WINDOW_SECONDS": "-1"}, "CDC_LOG__REPEAT_WINDOW_SECONDS"),
        ({"CDC_LOG__LEVEL": "loud"}, "CDC_LOG__LEVEL"),
        ({"CDC_HTTP__PORT": "70000"}, "CDC_HTTP__PORT"),
        ({"CDC_HTTP__PORT": "-1"}, "CDC_HTTP__PORT"),
        ({"CDC_CASSANDRA__PORT": "0"}, "CDC_CASSANDRA__PORT"),
        ({"CDC_KAFKA__SESSION_TIMEOUT_MS": "0"}, "CDC_KAFKA__SESSION_TIMEOUT_MS"),
        ({"CDC_KAFKA__SECURITY_PROTOCOL": "TLS"}, "CDC_KAFKA__SECURITY_PROTOCOL"),
        ({"CDC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "CDC_KAFKA__SASL_USERNAME"),
        (
            {
                "CDC_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "CDC_KAFKA__SASL_MECHANISM": "GSSAPI",
                "CDC_KAFKA__SASL_USERNAME": "u",
                "CDC_KAFKA__SASL_PASSWORD": "p",
            },
            "CDC_KAFKA__SASL_MECHANISM",
        ),
        ({"CDC_KAFKA__SSL_CAFILE": "/no/such/ca.pem"}, "CDC_KAFKA__SSL_CAFILE"),
        ({"CDC_KAFKA__SSL_CERTFILE": __file__}, "CDC_KAFKA__SSL_KEYFILE"),
        ({"CDC_KAFKA__MAX_POLL_INTERVAL_MS": "-1"}, "CDC_KAFKA__MAX_POLL_INTERVAL_MS"),
        ({"CDC_SCHEMA_REGISTRY__TIMEOUT_S": "0"}, "CDC_SCHEMA_REGISTRY__TIMEOUT_S"),
        ({"CDC_POSTGRES__CONNECT_TIMEOUT_S": "nan"}, "CDC_POSTGRES__CONNECT_TIMEOUT_S"),
        ({"CDC_SINK__EXPIRY_INTERVAL_SECONDS": "0"}, "CDC_SINK__EXPIRY_INTERVAL_SECONDS"),
        ({"CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS": "nan"}, "CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS"),
        ({"CDC_RECONCILIATION__POLL_SECONDS": "nan"}, "CDC_RECONCILIATION__POLL_SECONDS"),
        ({"CDC_RECONCILIATION__PUSH_TIMEOUT_SECONDS": "-1"}, "PUSH_TIMEOUT_SECONDS"),
        ({"CDC_RECONCILIATION__MAX_ROWS_PER_SECOND": "-1"}, "MAX_ROWS_PER_SECOND must be >= 0"),
        ({"CDC_TRACING__ENDPOINT": "collector:4318"}, "CDC_TRACING__ENDPOINT"),
        ({"CDC_TRACING__SAMPLE_RATIO": "1.5"}, "CDC_TRACING__SAMPLE_RATIO"),
        ({"CDC_TRACING__SAMPLE_RATIO": "nan"}, "CDC_TRACING__SAMPLE_RATIO"),
        ({"CDC_TRACING__SERVICE_NAME": " "}, "CDC_TRACING__SERVICE_NAME"),
        ({"CDC_TRACING__EXPORT_TIMEOUT_SECONDS": "0"}, "CDC_TRACING__EXPORT_TIMEOUT_SECONDS"),
        ({"CDC_VAULT__ADDR": "bao:8200"}, "CDC_VAULT__ADDR"),
        ({"CDC_VAULT__ROLE_ID": "r"}, "CDC_VAULT__ROLE_ID and CDC_VAULT__SECRET_ID go together"),
        ({"CDC_VAULT__POSTGRES_ROLE": "sink"}, "CDC_VAULT__POSTGRES_ROLE needs CDC_VAULT__ADDR"),
        (
            {"CDC_VAULT__CASSANDRA_SECRET": "c", "CDC_VAULT__ADDR": "http://127.0.0.1:8200"},
            "CDC_VAULT__CASSANDRA_SECRET needs a Vault login",
        ),
        ({"CDC_VAULT__TIMEOUT_SECONDS": "0"}, "CDC_VAULT__TIMEOUT_SECONDS"),
        ({"CDC_BOGUS__X": "1"}, "bogus"),
        ({"CDC_API__PORT": "70000"}, "CDC_API__PORT"),
        ({"CDC_API__JWT_SECRET": "short"}, "CDC_API__JWT_SECRET must be at least 32 bytes"),
        ({"CDC_API__JWKS_URL": "keys.example/jwks"}, "CDC_API__JWKS_URL"),
        ({"CDC_API__JWKS_FILE": "/no/such/jwks.json"}, "CDC_API__JWKS_FILE"),
        (
            {"CDC_API__JWT_SECRET": "s" * 32, "CDC_API__JWKS_URL": "http://127.0.0.1/jwks"},
            "exclude each other",
        ),
        ({"CDC_API__JWT_LEEWAY_S": "-1"}, "CDC_API__JWT_LEEWAY_S"),
        ({"CDC_API__MAX_CONNECTIONS": "0"}, "CDC_API__MAX_CONNECTIONS"),
        ({"CDC_API__MAX_HEADER_BYTES": "100"}, "CDC_API__MAX_HEADER_BYTES"),
        ({"CDC_API__REQUEST_TIMEOUT_S": "0"}, "CDC_API__REQUEST_TIMEOUT_S"),
        ({"CDC_DLQ__RESUME_POLL_SECONDS": "0"}, "CDC_DLQ__RESUME_POLL_SECONDS"),
        ({"CDC_GDPR__HASH_KEY": "short"}, "CDC_GDPR__HASH_KEY must be at least 32 bytes"),
        ({"CDC_GDPR__DLQ_RETENTION_DAYS": "0"}, "CDC_GDPR__DLQ_RETENTION_DAYS"),
        ({"CDC_GDPR__MISMATCH_RETENTION_DAYS": "-1"}, "CDC_GDPR__MISMATCH_RETENTION_DAYS"),
        ({"CDC_GDPR__AUDIT_RETENTION_DAYS": "nan"}, "CDC_GDPR__AUDIT_RETENTION_DAYS"),
        ({"CDC_GDPR__RETENTION_INTERVAL_SECONDS": "0"}, "CDC_GDPR__RETENTION_INTERVAL_SECONDS"),
        ({"CDC_GDPR__RETENTION_BATCH_ROWS": "0"}, "CDC_GDPR__RETENTION_BATCH_ROWS"),
        ({"CDC_GDPR__RETENTION_BATCH_ROWS": "100001"}, "CDC_GDPR__RETENTION_BATCH_ROWS"),
        (
            {"CDC_VAULT__GDPR_HASH_KEY": "k", "CDC_VAULT__ADDR": "http://127.0.0.1:8200"},
            "CDC_VAULT__GDPR_HASH_KEY needs a Vault login",
        ),
        (
            {
                "CDC_VAULT__GDPR_HASH_KEY": "k",
                "CDC_VAULT__ADDR": "http://127.0.0.1:8200",
                "CDC_VAULT__TOKEN": "t",
                "CDC_GDPR__HASH_KEY": "h" * 32,
            },
            "choose one of CDC_GDPR__HASH_KEY and CDC_VAULT__GDPR_HASH_KEY",
        ),
        (
            {"CDC_VAULT__API_JWT_SECRET": "k", "CDC_VAULT__ADDR": "http://127.0.0.1:8200"},
            "CDC_VAULT__API_JWT_SECRET needs a Vault login",
        ),
        (
            {
                "CDC_VAULT__API_JWT_SECRET": "k",
                "CDC_VAULT__ADDR": "http://127.0.0.1:8200",
                "CDC_VAULT__TOKEN": "t",
                "CDC_API__JWT_SECRET": "s" * 32,
            },
            "choose one of",
        ),
    ],
)
def test_invalid_settings_are_named(environ: dict[str, str], named: str) -> None:
    """Every invalid value or unknown key stops loading with a message naming it."""
    with pytest.raises(ConfigError, match=named):
        load_settings(environ)


def test_reconciliation_owns_its_section_under_the_same_names(tmp_path: Path) -> None:
    """[reconciliation] and CDC_RECONCILIATION__* load through the composition root into
    reconciliation's own settings (defaults when absent); the sink's loader alone refuses them."""
    file = tmp_path / "sink.toml"
    file.write_text('[reconciliation]\nschedule = "users:checksum@60"\npage_size = 10\n')
    environ = {"CDC_RECONCILIATION__PAGE_SIZE": "20", "CDC_RECONCILIATION__ENABLED": "true"}
    settings = reconciliation_settings(load_settings(environ, file))
    assert (settings.enabled, settings.page_size) == (True, 20)
    assert settings.schedule_entries() == [("users", "checksum", 60)]
    assert reconciliation_settings(load_config({})) == ReconciliationConfig()
    with pytest.raises(ConfigError, match="no section 'reconciliation'"):
        load_config({"CDC_RECONCILIATION__ENABLED": "true"})


def test_a_broken_file_is_reported(tmp_path: Path) -> None:
    """A TOML syntax error names the file."""
    file = tmp_path / "bad.toml"
    file.write_text("[kafka\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config({}, file)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sink = 5\n", r"settings\.toml: sink must be a \[sink\] table"),
        ("[sink]\nbatch_size = 1.5\n", r"CDC_SINK__BATCH_SIZE=1\.5 is invalid: expected a whole"),
        ("[sink]\nbatch_size = true\n", "CDC_SINK__BATCH_SIZE=True is invalid: expected a number"),
        (
            "[kafka]\ntopic_pattern = {a = 1}\n",
            "TOPIC_PATTERN=.* is invalid: expected text, not dict",
        ),
        ("[kafka]\ngroup_id = 7\n", "CDC_KAFKA__GROUP_ID=7 is invalid: expected text, not int"),
        ("[postgres]\ndsn = 5\n", r"CDC_POSTGRES__DSN=\*\*\* is invalid: expected text"),
    ],
)
def test_file_values_of_the_wrong_kind_are_named(tmp_path: Path, text: str, message: str) -> None:
    """TOML has types: a number where text belongs (or a fraction where a count does) is an
    error naming the setting, never silently converted."""
    file = tmp_path / "settings.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config({}, file)


def test_file_values_of_the_right_kind_load(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text('[sink]\nbatch_size = 500\nlinger_ms = "20"\nretry_max_seconds = 30\n')
    sink = load_config({}, file).sink
    assert (sink.batch_size, sink.linger_ms, sink.retry_max_seconds) == (500, 20, 30.0)


def test_kafka_security_becomes_aiokafka_arguments() -> None:
    """PLAINTEXT adds nothing but the protocol; SASL_SSL adds the mechanism, the credentials
    and a TLS context (the system's CAs when no CA file is given)."""
    assert client_security(load_config({}).kafka) == {"security_protocol": "PLAINTEXT"}
    secured = load_config(
        {
            "CDC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "CDC_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "CDC_KAFKA__SASL_USERNAME": "sink",
            "CDC_KAFKA__SASL_PASSWORD": "s3cret",
        }
    ).kafka
    options = client_security(secured)
    assert isinstance(options.pop("ssl_context"), ssl.SSLContext)
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "sink",
        "sasl_plain_password": "s3cret",
    }
    assert "s3cret" not in repr(secured)


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("CDC_SCHEMA_REGISTRY__URL", "ftp://sink:s3cret@registry"),
        ("CDC_SCHEMA_REGISTRY__URL", "http://sink:s3cret@"),
        ("CDC_SCHEMA_REGISTRY__URL", "registry:8081"),
        ("CDC_SCHEMA_REGISTRY__URL", "http://registry:99999"),
        ("CDC_PUSHGATEWAY__URL", "gopher://sink:s3cret@gateway"),
        ("CDC_ALERTMANAGER__URL", "alertmanager"),
    ],
)
def test_urls_are_checked_without_showing_their_password(setting: str, url: str) -> None:
    """A URL the worker would fail on later is refused at start-up, naming the setting; basic
    auth in it (user:password@) is masked in the message."""
    with pytest.raises(ConfigError, match=f"{setting} must be an http") as caught:
        load_config({setting: url})
    assert "s3cret" not in str(caught.value)


def test_a_url_with_basic_auth_is_accepted() -> None:
    url = "https://sink:s3cret@registry.example:8081/apis/ccompat/v7"
    assert load_config({"CDC_SCHEMA_REGISTRY__URL": url}).schema_registry.url == url


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "api.internal"])  # noqa: S104
def test_a_control_api_beyond_loopback_needs_tokens_or_the_opt_out(host: str) -> None:
    """CDC_API__HOST beyond loopback without any token setting is refused with a message
    naming the host setting, every token setting and the opt-out; a token setting or
    CDC_API__INSECURE_NO_AUTH=true lets it start."""
    with pytest.raises(ConfigError) as refused:
        load_config({"CDC_API__HOST": host})
    for setting in (
        "CDC_API__HOST",
        "CDC_API__JWT_SECRET",
        "CDC_VAULT__API_JWT_SECRET",
        "CDC_API__JWKS_URL",
        "CDC_API__JWKS_FILE",
        "CDC_API__INSECURE_NO_AUTH",
    ):
        assert setting in str(refused.value)
    assert (
        load_config({"CDC_API__HOST": host, "CDC_API__INSECURE_NO_AUTH": "true"}).api.host == host
    )
    secret = {"CDC_API__HOST": host, "CDC_API__JWT_SECRET": "s" * 32}
    assert load_config(secret).api.jwt_secret is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_both_listeners_default_to_loopback_and_loopback_needs_no_tokens(host: str) -> None:
    """Both listeners bind 127.0.0.1 by default; any loopback host serves the control API
    without tokens."""
    defaults = load_config({})
    assert (defaults.http.host, defaults.api.host) == ("127.0.0.1", "127.0.0.1")
    assert load_config({"CDC_API__HOST": host}).api.host == host
