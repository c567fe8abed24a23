"""TLS settings: validated with messages naming them, turned into verifying TLS 1.2+ contexts."""

from __future__ import annotations

import asyncio
import base64
import ssl

import httpx2 as httpx
import pytest
import trustme

from cdc_sink.config import ConfigError, load_config
from cdc_sink.decode.registry import ConfluentRegistry
from cdc_sink.errors import FatalError
from cdc_sink.ops.secrets import postgres_tls
from cdc_sink.ops.tls import client_context, is_untrusted_certificate
from cdc_sink.schema.cassandra import tls_context


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA bundle, and a client certificate and key it signed, as PEM files."""
    folder = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    client = ca.issue_cert("client@example")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    (folder / "garbage.pem").write_text("not a certificate\n")
    return {name: str(path) for name, path in files.items()} | {
        "garbage": str(folder / "garbage.pem")
    }


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"CDC_POSTGRES__SSLMODE": "strict"}, "CDC_POSTGRES__SSLMODE must be one of"),
        ({"CDC_POSTGRES__SSLROOTCERT": "/no/such.pem"}, "CDC_POSTGRES__SSLROOTCERT needs"),
        (
            {"CDC_POSTGRES__SSLMODE": "verify-full", "CDC_POSTGRES__SSLROOTCERT": "/no/such.pem"},
            "CDC_POSTGRES__SSLROOTCERT: no such file",
        ),
        ({"CDC_POSTGRES__SSLCERT": __file__}, "CDC_POSTGRES__SSLCERT and CDC_POSTGRES__SSLKEY"),
        (
            {
                "CDC_POSTGRES__DSN": "postgresql://h/db?sslmode=require",
                "CDC_POSTGRES__SSLMODE": "verify-full",
            },
            "CDC_POSTGRES__SSLMODE is set and CDC_POSTGRES__DSN holds sslmode too",
        ),
        ({"CDC_SCHEMA_REGISTRY__USERNAME": "u"}, "CDC_SCHEMA_REGISTRY__USERNAME and"),
        (
            {
                "CDC_SCHEMA_REGISTRY__URL": "https://a:b@sr:8081",
                "CDC_SCHEMA_REGISTRY__USERNAME": "u",
                "CDC_SCHEMA_REGISTRY__PASSWORD": "p",
            },
            "give the credentials in one place",
        ),
        ({"CDC_SCHEMA_REGISTRY__SSL_CAFILE": "/no/such.pem"}, "CDC_SCHEMA_REGISTRY__SSL_CAFILE"),
        ({"CDC_CASSANDRA__USERNAME": "u"}, "CDC_CASSANDRA__USERNAME and CDC_CASSANDRA__PASSWORD"),
        ({"CDC_CASSANDRA__SSL_CAFILE": __file__}, "need CDC_CASSANDRA__SSL=true"),
        (
            {"CDC_CASSANDRA__SSL": "true", "CDC_CASSANDRA__SSL_KEYFILE": __file__},
            "CDC_CASSANDRA__SSL_CERTFILE and CDC_CASSANDRA__SSL_KEYFILE go together",
        ),
        (
            {"CDC_CASSANDRA__SSL": "true", "CDC_CASSANDRA__SSL_CAFILE": "/no/such.pem"},
            "CDC_CASSANDRA__SSL_CAFILE: no such file",
        ),
        ({"CDC_VAULT__ADDR": "http://vault.internal:8200"}, "CDC_VAULT__ALLOW_PLAIN_HTTP"),
        ({"CDC_VAULT__ADDR": "http://10.0.0.5:8200"}, "CDC_VAULT__ADDR is http://"),
        ({"CDC_VAULT__SSL_CAFILE": "/no/such.pem"}, "CDC_VAULT__SSL_CAFILE: no such file"),
    ],
)
def test_invalid_tls_settings_are_named(environ: dict[str, str], named: str) -> None:
    """Every inconsistent or missing TLS and credential setting stops loading, naming it."""
    with pytest.raises(ConfigError, match=named):
        load_config(environ)


@pytest.mark.parametrize(
    ("addr", "allowed"),
    [
        ("http://127.0.0.1:8200", False),
        ("http://127.8.0.1:8200", False),
        ("http://localhost:8200", False),
        ("http://[::1]:8200", False),
        ("https://vault.internal:8200", False),
        ("http://vault.internal:8200", True),
    ],
)
def test_plain_http_vault_is_loopback_only_unless_allowed(addr: str, allowed: bool) -> None:
    """http:// Vault is accepted on loopback, and beyond it only with ALLOW_PLAIN_HTTP."""
    environ = {"CDC_VAULT__ADDR": addr}
    if allowed:
        environ["CDC_VAULT__ALLOW_PLAIN_HTTP"] = "true"
    assert load_config(environ).vault.addr == addr


def test_contexts_require_tls_12_and_verify(pem: dict[str, str]) -> None:
    """A client context refuses anything older than TLS 1.2 and checks certificate and name."""
    context = client_context("CDC_X__SSL_CAFILE", pem["ca"], pem["cert"], pem["key"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


@pytest.mark.parametrize("which", ["ca", "cert"])
def test_unusable_pem_files_are_named(pem: dict[str, str], which: str) -> None:
    """A CA bundle or client certificate that does not load is a ConfigError naming the setting."""
    ca, cert = (pem["garbage"], None) if which == "ca" else (pem["ca"], pem["garbage"])
    with pytest.raises(ConfigError, match="CDC_X__SSL_CAFILE: cannot load"):
        client_context("CDC_X__SSL_CAFILE", ca, cert, pem["key"] if cert else None)


@pytest.mark.parametrize(
    ("mode", "verify_mode", "check_hostname"),
    [
        ("require", ssl.CERT_NONE, False),
        ("verify-ca", ssl.CERT_REQUIRED, False),
        ("verify-full", ssl.CERT_REQUIRED, True),
    ],
)
def test_postgres_sslmodes_keep_libpq_meanings(
    pem: dict[str, str], mode: str, verify_mode: ssl.VerifyMode, check_hostname: bool
) -> None:
    """require encrypts only, verify-ca checks the chain, verify-full also the host name."""
    environ = {"CDC_POSTGRES__SSLMODE": mode}
    if mode != "require":
        environ["CDC_POSTGRES__SSLROOTCERT"] = pem["ca"]
    context = postgres_tls(load_config(environ).postgres)
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (context.verify_mode, context.check_hostname) == (verify_mode, check_hostname)


def test_postgres_without_tls_settings_leaves_the_dsn_in_charge() -> None:
    """No CDC_POSTGRES__SSL* setting: asyncpg gets no ssl argument; prefer passes through."""
    dsn = "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    assert postgres_tls(load_config({"CDC_POSTGRES__DSN": dsn}).postgres) is None
    assert postgres_tls(load_config({"CDC_POSTGRES__SSLMODE": "prefer"}).postgres) == "prefer"


def test_cassandra_context_only_when_asked(pem: dict[str, str]) -> None:
    """CDC_CASSANDRA__SSL off: no context; on: one that verifies the CA and the node's name."""
    assert tls_context(load_config({}).cassandra) is None
    environ = {"CDC_CASSANDRA__SSL": "true", "CDC_CASSANDRA__SSL_CAFILE": pem["ca"]}
    context = tls_context(load_config(environ).cassandra)
    assert context is not None
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_registry_settings_send_basic_auth() -> None:
    """CDC_SCHEMA_REGISTRY__USERNAME and __PASSWORD go out as HTTP basic auth."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(401, json={"error_code": 40101, "message": "Unauthorized"})

    settings = load_config(
        {
            "CDC_SCHEMA_REGISTRY__URL": "https://sr.example",
            "CDC_SCHEMA_REGISTRY__USERNAME": "reader",
            "CDC_SCHEMA_REGISTRY__PASSWORD": "pw",
        }
    ).schema_registry
    registry = ConfluentRegistry.from_config(settings)
    registry._http._transport = httpx.MockTransport(answer)  # no network here

    async def ask() -> None:
        async with registry:
            await registry.schema_by_id(1)

    with pytest.raises(FatalError, match="CDC_SCHEMA_REGISTRY__PASSWORD"):
        asyncio.run(ask())
    assert seen == ["Basic " + base64.b64encode(b"reader:pw").decode()]


def test_untrusted_certificates_are_found_in_causes() -> None:
    """A verification failure is recognised when wrapped by a client library's own error."""
    wrapped = ConnectionError("wrapped")
    wrapped.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert is_untrusted_certificate(wrapped)
    assert not is_untrusted_certificate(ConnectionError("refused"))
