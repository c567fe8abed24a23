"""The control API's bearer tokens, scopes and audit trail, against a running worker.

Tokens are minted here with PyJWT: HS256 with a shared secret (from the settings or from the
stack's Vault), RS256 and ES256 with keys published as a JWKS over HTTP on 127.0.0.1 or in a
file, rotated while the worker runs.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from cdc_sink.errors import FatalError
from tests.support.names import Unique
from tests.support.pipeline import create_topic, http_get, run_cli, sink_env, sql
from tests.support.stack import Endpoints
from tests.support.vault import root_client

SECRET = "a shared secret of more than thirty-two bytes"


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    """A JWT for `sub` "alice" valid for a minute, with `claims` added (None removes one)."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 60, **claims}
    headers = {"kid": body.pop("kid")} if "kid" in body else None
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm, headers=headers
    )


def call(
    port: int, method: str, path: str, bearer: str | None = None, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    """One request to the worker on loopback: status, headers (lower-case), JSON body."""
    headers = {"Content-Type": "application/json", "X-Request-ID": uuid.uuid4().hex}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = exc.code, dict(exc.headers), json.loads(exc.read())
    return answer[0], {k.lower(): v for k, v in answer[1].items()}, answer[2]


@asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[SinkApp]:
    """A worker of these settings, until the block ends."""
    worker = SinkApp(load_config(env))
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(60):
            while worker.http is None or worker.worker.group_state != "joined":
                assert not task.done(), task.exception()
                await asyncio.sleep(0.1)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


@pytest.fixture
async def base_env(stack: Endpoints, unique: Unique) -> dict[str, str]:
    topic = unique("cdc-events-auth")
    await create_topic(stack.kafka, topic, partitions=1)
    return sink_env(stack, topic=topic, group=unique("g"), schema=unique.schema("auth"))


async def test_each_scope_opens_its_own_routes_and_state_changes_are_audited(
    stack: Endpoints, base_env: dict[str, str]
) -> None:
    """With an HS256 secret: cdc:read lists dead letters and jobs but may not read a payload
    or change state (403); cdc:payload reads a dead letter and mismatches; cdc:write resumes
    and creates; every change is in _cdc_audit_log with the token's sub and the request id
    the client sent, which its log line carries too; the probes need no token."""
    env = {**base_env, "CDC_API__JWT_SECRET": SECRET}
    async with running(env) as worker:
        assert worker.http is not None
        assert worker.probes is not None
        port = worker.http.port
        reader = token(scope="cdc:read")
        payload = token(scope="cdc:payload")
        writer = token(scope="cdc:write", sub="ops-bot")

        def ask(method: str, path: str, bearer: str, body: Any = None) -> tuple[int, Any]:
            status, _, answer = call(port, method, path, bearer, body)
            return status, answer

        assert (await asyncio.to_thread(ask, "GET", "/dlq", reader)) == (200, {"records": []})
        assert (await asyncio.to_thread(ask, "GET", "/reconciliation/jobs", reader))[0] == 200
        for method, path, body in (
            ("GET", "/dlq/1", None),
            ("GET", "/reconciliation/mismatches", None),
            ("POST", "/dlq/resume", {}),
            ("POST", "/dlq/replay", {"all": True}),
            ("POST", "/reconciliation/jobs", {"table": "t", "strategy": "row_count"}),
            ("POST", "/reconciliation/mismatches/1/resolve", {"resolution": "x"}),
        ):
            status, headers, answer = await asyncio.to_thread(
                call, port, method, path, reader, body
            )
            assert status == 403, (path, answer)
            assert "insufficient_scope" in headers["www-authenticate"]
        assert (await asyncio.to_thread(ask, "GET", "/dlq/1", payload)) == (
            404,
            {"error": "no dead letter 1"},
        )
        assert (await asyncio.to_thread(ask, "GET", "/reconciliation/mismatches", payload))[0] == (
            200
        )
        assert (await asyncio.to_thread(ask, "GET", "/dlq", payload))[0] == 403
        status, headers, answer = await asyncio.to_thread(
            call, port, "POST", "/dlq/resume", writer, {"topic": "elsewhere"}
        )
        assert (status, answer) == (200, {"resumed": []})
        request_id = headers["x-request-id"]
        status, answer = await asyncio.to_thread(
            ask, "POST", "/reconciliation/jobs", writer, {"table": "nope", "strategy": "checksum"}
        )
        assert status in (404, 503)  # no such table (or no Cassandra): nothing created
        for path in ("/health", "/ready", "/metrics"):
            status, _ = await asyncio.to_thread(http_get, worker.probes.port, path)
            assert status == 200
    audit = await sql(
        stack.postgres_dsn,
        base_env["CDC_POSTGRES__SCHEMA"],
        "SELECT actor, action, details, request_id FROM _cdc_audit_log ORDER BY id",
    )
    assert [
        (a["actor"], a["action"], json.loads(a["details"]), a["request_id"]) for a in audit
    ] == [("ops-bot", "dlq_resume", {"topic": "elsewhere", "partition": None}, request_id)]


@pytest.mark.parametrize(
    ("claims", "key", "why"),
    [
        ({"exp": int(time.time()) - 3600}, SECRET, "expired"),
        ({"exp": None}, SECRET, "exp"),
        ({"nbf": int(time.time()) + 3600}, SECRET, "not yet valid"),
        ({"iss": "someone-else"}, SECRET, "issuer"),
        ({"iss": None}, SECRET, "iss"),
        ({"aud": "another-service"}, SECRET, "audience"),
        ({}, "another secret of more than thirty-two bytes", "Signature verification failed"),
    ],
)
async def test_bad_tokens_are_401_with_a_bearer_challenge(
    base_env: dict[str, str], claims: dict[str, Any], key: str, why: str
) -> None:
    """Tokens expired, without exp, not yet valid (nbf), from another issuer or for another
    audience (both configured), or signed with another secret, answer 401 naming why, with
    WWW-Authenticate: Bearer; no token at all does too; a sound token passes."""
    env = {
        **base_env,
        "CDC_API__JWT_SECRET": SECRET,
        "CDC_API__JWT_ISSUER": "https://issuer.example",
        "CDC_API__JWT_AUDIENCE": "cdc-sink",
        "CDC_API__JWT_LEEWAY_S": "5",
    }
    sound = {"scope": "cdc:read", "iss": "https://issuer.example", "aud": "cdc-sink"}
    async with running(env) as worker:
        assert worker.http is not None
        port = worker.http.port
        bad = token(key, **{**sound, **claims})
        status, headers, answer = await asyncio.to_thread(call, port, "GET", "/dlq", bad)
        assert status == 401
        assert why.lower() in answer["error"].lower()
        assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        status, headers, answer = await asyncio.to_thread(call, port, "GET", "/dlq")
        assert (status, answer) == (401, {"error": "a bearer token is required"})
        assert headers["www-authenticate"] == "Bearer"
        status, _, _ = await asyncio.to_thread(call, port, "GET", "/dlq", token(**sound))
        assert status == 200


class JwksServer:
    """A JWKS document served on 127.0.0.1, replaceable while served; counts its reads."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.reads = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.reads += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"


@contextmanager
def serving_jwks() -> Iterator[JwksServer]:
    served = JwksServer()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()


@asynccontextmanager
async def worker_with_jwks(
    base_env: dict[str, str], *keys: dict[str, Any]
) -> AsyncIterator[tuple[JwksServer, int]]:
    """A worker whose tokens are checked against `keys` served as a JWKS URL: the server,
    and the control API's port."""
    with serving_jwks() as jwks:
        jwks.document = {"keys": list(keys)}
        async with running({**base_env, "CDC_API__JWKS_URL": jwks.url}) as worker:
            assert worker.http is not None
            yield jwks, worker.http.port


def hs256_with(key: bytes, kid: str) -> str:
    """An HS256 token whose HMAC key is `key` (PyJWT refuses to sign one with a public key's
    PEM: this is the forgery a verifier must not accept)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    claims = {"sub": "mallory", "scope": "cdc:read", "exp": int(time.time()) + 60}
    signed = f"{header}.{part(json.dumps(claims).encode())}"
    return f"{signed}.{part(hmac.digest(key, signed.encode(), 'sha256'))}"


def public_jwk(private: Any, kid: str, algorithm: str) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(algorithm)
    jwk: dict[str, Any] = json.loads(algo.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "alg": algorithm, "use": "sig"}


async def test_keys_from_a_jwks_url_are_read_again_for_an_unknown_kid(
    base_env: dict[str, str],
) -> None:
    """RS256 tokens verify with the key the JWKS URL publishes; once an ES256 key is added
    (rotation), a token with its kid makes the worker read the set again and pass; a token
    whose kid is in no set, or that is signed with HS256 by the public key's bytes, is 401."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    async with worker_with_jwks(base_env, public_jwk(rsa_key, "rsa-1", "RS256")) as (jwks, port):
        first = token(rsa_key, "RS256", kid="rsa-1", scope="cdc:read")
        assert (await asyncio.to_thread(call, port, "GET", "/dlq", first))[0] == 200
        reads = jwks.reads
        assert reads == 1  # at start-up; a known kid needs no read
        jwks.document = {
            "keys": [public_jwk(rsa_key, "rsa-1", "RS256"), public_jwk(ec_key, "ec-2", "ES256")]
        }
        await asyncio.sleep(1.1)  # reads of the set are at least a second apart
        rotated = token(ec_key, "ES256", kid="ec-2", scope="cdc:read")
        assert (await asyncio.to_thread(call, port, "GET", "/dlq", rotated))[0] == 200
        assert jwks.reads == reads + 1
        await asyncio.sleep(1.1)
        stranger = token(ec.generate_private_key(ec.SECP256R1()), "ES256", kid="ec-9")
        status, _, answer = await asyncio.to_thread(call, port, "GET", "/dlq", stranger)
        assert (status, answer) == (401, {"error": "unknown signing key 'ec-9'"})
        assert jwks.reads == reads + 2
        status, _, _ = await asyncio.to_thread(call, port, "GET", "/dlq", first)
        assert status == 200
        pem = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        forged = hs256_with(pem, "rsa-1")
        status, _, answer = await asyncio.to_thread(call, port, "GET", "/dlq", forged)
        assert (status, answer) == (401, {"error": "The specified alg value is not allowed"})


async def test_a_jwks_that_cannot_be_read_stops_start_up_or_refuses_unknown_kids(
    base_env: dict[str, str],
) -> None:
    """A JWKS URL nobody answers at start-up stops the worker with a FatalError naming
    CDC_API__JWKS_URL; once the key server goes away, a token with an unknown kid is 401
    saying the keys cannot be read, while a token with a known kid still passes."""
    with serving_jwks() as gone:
        url = gone.url
    with pytest.raises(FatalError, match="CDC_API__JWKS_URL"):
        await asyncio.wait_for(
            SinkApp(load_config({**base_env, "CDC_API__JWKS_URL": url})).run(), 60
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with worker_with_jwks(base_env, public_jwk(key, "k1", "RS256")) as (jwks, port):
        jwks.server.shutdown()
        jwks.server.server_close()
        await asyncio.sleep(1.1)
        unknown = token(key, "RS256", kid="k2", scope="cdc:read")
        status, _, answer = await asyncio.to_thread(call, port, "GET", "/dlq", unknown)
        assert status == 401
        assert answer["error"].startswith("the signing keys cannot be read")
        known = token(key, "RS256", kid="k1", scope="cdc:read")
        assert (await asyncio.to_thread(call, port, "GET", "/dlq", known))[0] == 200


async def test_keys_from_a_jwks_file_verify_es256_tokens(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    """ES256 tokens verify with a key from CDC_API__JWKS_FILE; a key added to the file later
    is found once a token names its kid."""
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(old, "old", "ES256")]}))
    async with running({**base_env, "CDC_API__JWKS_FILE": str(path)}) as worker:
        assert worker.http is not None
        port = worker.http.port
        signed = token(old, "ES256", kid="old", scope="cdc:read")
        assert (await asyncio.to_thread(call, port, "GET", "/dlq", signed))[0] == 200
        keys = [public_jwk(old, "old", "ES256"), public_jwk(new, "new", "ES256")]
        path.write_text(json.dumps({"keys": keys}))
        await asyncio.sleep(1.1)
        signed = token(new, "ES256", kid="new", scope="cdc:read")
        assert (await asyncio.to_thread(call, port, "GET", "/dlq", signed))[0] == 200


async def test_the_hs256_secret_may_come_from_vault_kv(
    stack: Endpoints, base_env: dict[str, str], unique: Unique
) -> None:
    """With CDC_VAULT__API_JWT_SECRET the worker reads the HS256 key from Vault KV v2 at
    start: tokens signed with it pass, tokens signed with another are 401; a secret without
    a `secret` stops start-up with a message naming the setting."""
    vault_secret = "a key kept in vault, longer than thirty-two bytes"
    path = unique("api-jwt")
    client = root_client(stack)
    await asyncio.to_thread(
        client.secrets.kv.v2.create_or_update_secret,
        path,
        secret={"secret": vault_secret},
        mount_point="secret",
    )
    env = {
        **base_env,
        "CDC_VAULT__ADDR": stack.vault_addr,
        "CDC_VAULT__TOKEN": stack.vault_token,
        "CDC_VAULT__API_JWT_SECRET": path,
    }
    try:
        async with running(env) as worker:
            assert worker.http is not None
            port = worker.http.port
            good = token(vault_secret, scope="cdc:read")
            assert (await asyncio.to_thread(call, port, "GET", "/dlq", good))[0] == 200
            assert (await asyncio.to_thread(call, port, "GET", "/dlq", token(scope="cdc:read")))[
                0
            ] == 401
        await asyncio.to_thread(
            client.secrets.kv.v2.create_or_update_secret,
            path,
            secret={"key": vault_secret},
            mount_point="secret",
        )
        with pytest.raises(FatalError, match="CDC_VAULT__API_JWT_SECRET"):
            await asyncio.wait_for(SinkApp(load_config(env)).run(), 60)
    finally:
        await asyncio.to_thread(
            client.secrets.kv.v2.delete_metadata_and_all_versions, path, mount_point="secret"
        )


async def test_a_control_api_beyond_loopback_without_tokens_refuses_to_start(
    base_env: dict[str, str],
) -> None:
    """`run` with CDC_API__HOST=0.0.0.0 and no token settings exits 2 naming the settings
    and the opt-out, before it connects to anything."""
    env = {**base_env, "CDC_API__HOST": "0.0.0.0"}  # noqa: S104 - never bound: refused
    refused = await asyncio.to_thread(run_cli, env, "run", timeout=60)
    assert refused.returncode == 2
    for setting in ("CDC_API__HOST", "CDC_API__JWT_SECRET", "CDC_API__INSECURE_NO_AUTH"):
        assert setting in refused.stderr


async def test_the_cli_audits_its_replays_as_its_os_user(
    stack: Endpoints, base_env: dict[str, str]
) -> None:
    """A `dlq replay` from the command line leaves an audit row with actor cli:<os user>
    and the request id its log lines carry."""
    env = {**base_env, "CDC_LOG__LEVEL": "info"}
    schema = base_env["CDC_POSTGRES__SCHEMA"]
    topic = base_env["CDC_KAFKA__TOPIC_PATTERN"].strip("^$")
    assert (await asyncio.to_thread(run_cli, env, "migrate")).returncode == 0
    await sql(
        stack.postgres_dsn,
        schema,
        "INSERT INTO _cdc_dlq_records (source_topic, source_partition, source_offset, "
        "record_key, record_value, error_class, error_message, stage) "
        "VALUES ($1, 0, 0, 'k', 'v', 'DecodeError', 'test', 'decode')",
        topic,
    )
    replayed = await asyncio.to_thread(run_cli, env, "dlq", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    audit = await sql(
        stack.postgres_dsn, schema, "SELECT actor, action, request_id FROM _cdc_audit_log"
    )
    [(actor, action, request_id)] = [tuple(row) for row in audit]
    assert (actor, action) == (f"cli:{getpass.getuser()}", "dlq_replay")
    lines = [json.loads(line) for line in replayed.stderr.splitlines() if line.startswith("{")]
    assert any(
        line.get("event") == "audited" and line.get("request_id") == request_id for line in lines
    )
