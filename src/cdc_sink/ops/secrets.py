"""Secrets from Vault (or OpenBao, which speaks its API) through hvac.

- The login: a token (CDC_VAULT__TOKEN) or AppRole (CDC_VAULT__ROLE_ID and __SECRET_ID); an
  AppRole token is renewed before it expires, and logged in again when it cannot be (then a
  new PostgreSQL user is leased at once: Vault revokes a token's leases when it ends).
- PostgreSQL: with CDC_VAULT__POSTGRES_ROLE, every connection logs in with a user and password
  leased from the database secrets engine instead of those of CDC_POSTGRES__DSN (which still
  gives host, port, database and options). The lease is renewed at two thirds of its time.
  Once Vault grants less than asked (its max TTL is near; the old user then has at least a
  third of a lease left) a new user is leased: the pools reconnect their idle connections and
  replace busy ones as they are handed back, and the writer moves between two transactions,
  so no batch fails for it and no session outlives its user (PostgreSQL keeps a session whose
  role is dropped). The old lease ends on its own; the last one is revoked at exit.
- Cassandra: with CDC_VAULT__CASSANDRA_SECRET, the username and password are read from KV v2
  at start; the control API's HS256 key likewise with CDC_VAULT__API_JWT_SECRET (its `secret`).

hvac is blocking: every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from cdc_sink.config import Config, PostgresConfig, Secret, VaultConfig
from cdc_sink.errors import FatalError
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.tls import client_context, is_untrusted_certificate, untrusted_hint
from cdc_sink.retry import RetryPolicy
from cdc_sink.schema.tables import quote_ident

log = get_logger("cdc_sink.secrets")

RENEW_AT = 2 / 3  # of a lease's or token's time
# While Vault does not answer: 1 s doubling up to 30 s, until the lease expires.
RENEWAL_RETRY = RetryPolicy(attempts=0, base_s=1.0, cap_s=30.0, jitter=False)


class VaultError(FatalError):
    """Vault refused or could not be reached when a secret was needed to start."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="vault")


@dataclass
class Lease:
    id: str  # "" for a token
    duration_s: float  # as first granted
    renewable: bool
    expires_at: float  # time.monotonic()

    def expires_at_unix(self) -> float:
        return time.time() + (self.expires_at - time.monotonic())

    @classmethod
    def granted(cls, lease_id: str, duration_s: float, renewable: bool) -> Lease:
        return cls(lease_id, duration_s, renewable, time.monotonic() + duration_s)

    def renew_at(self) -> float:
        return self.expires_at - self.duration_s * (1 - RENEW_AT)


class Vault:
    """A client logged in to Vault; every method raises hvac's or requests' errors."""

    def __init__(self, config: VaultConfig) -> None:
        import hvac

        self.config = config
        # requests takes a CA bundle's path (or True: its own trusted CAs) as `verify`
        self.client = hvac.Client(
            url=config.addr, timeout=config.timeout_seconds, verify=config.ssl_cafile or True
        )
        self.token: Lease | None = None  # None: a token that does not expire

    async def login(self) -> None:
        cfg = self.config
        if cfg.role_id:
            secret_id = cfg.secret_id.reveal() if cfg.secret_id else None
            answer = await asyncio.to_thread(
                self.client.auth.approle.login,
                role_id=cfg.role_id,
                secret_id=secret_id,
                mount_point=cfg.approle_mount,
            )
            auth = answer["auth"]
            ttl, renewable = auth["lease_duration"], auth["renewable"]
        else:
            assert cfg.token is not None  # VaultConfig.validate
            self.client.token = cfg.token.reveal()
            data = (await asyncio.to_thread(self.client.auth.token.lookup_self))["data"]
            ttl, renewable = data["ttl"], data["renewable"]
        self.token = Lease.granted("", ttl, renewable) if ttl else None

    async def keep_token(self) -> bool:
        """Renew the token if it is due, or log in again if Vault will not renew it in full;
        True after a new login (leases made with the old token end with it)."""
        token = self.token
        if token is None or time.monotonic() < token.renew_at():
            return False
        if token.renewable:
            answer = await asyncio.to_thread(self.client.auth.token.renew_self)
            token.expires_at = time.monotonic() + answer["auth"]["lease_duration"]
            if answer["auth"]["lease_duration"] >= token.duration_s:
                log.info("vault_token_renewed", ttl_s=answer["auth"]["lease_duration"])
                return False
        if self.config.role_id:
            await self.login()
            log.info("vault_logged_in_again", method="approle")
            return True
        left = round(token.expires_at - time.monotonic())
        raise VaultError(f"CDC_VAULT__TOKEN cannot be renewed in full and ends in {left} s")

    async def kv(self, path: str) -> dict[str, Any]:
        answer = await asyncio.to_thread(
            self.client.secrets.kv.v2.read_secret_version,
            path,
            mount_point=self.config.kv_mount,
            raise_on_deleted_version=True,
        )
        data: dict[str, Any] = answer["data"]["data"]
        return data

    async def database_login(self) -> tuple[str, Secret, Lease]:
        assert self.config.postgres_role is not None
        answer = await asyncio.to_thread(
            self.client.secrets.database.generate_credentials,
            name=self.config.postgres_role,
            mount_point=self.config.database_mount,
        )
        data = answer["data"]
        lease = Lease.granted(answer["lease_id"], answer["lease_duration"], answer["renewable"])
        return data["username"], Secret(data["password"]), lease

    async def renew(self, lease: Lease) -> float:
        """Ask for the lease's first duration again; return what Vault granted."""
        answer = await asyncio.to_thread(
            self.client.sys.renew_lease, lease.id, increment=int(lease.duration_s)
        )
        granted = float(answer["lease_duration"])
        lease.expires_at = time.monotonic() + granted
        return granted

    async def revoke(self, lease: Lease) -> None:
        await asyncio.to_thread(self.client.sys.revoke_lease, lease.id)


class PostgresLogin:
    """How every PostgreSQL connection of the process logs in: as CDC_POSTGRES__DSN says, or
    as a user leased from Vault (kept valid by `keep_valid`); then, if CDC_POSTGRES__ROLE is
    set, as that role (SET ROLE), so what the sink creates belongs to it and not to a login
    that comes and goes."""

    def __init__(self, config: Config, vault: Vault | None = None) -> None:
        self.postgres = config.postgres
        self.ssl = postgres_tls(config.postgres)
        self.vault = vault
        self.user: str | None = None
        self.password: Secret | None = None
        self.lease: Lease | None = None
        self.generation = 0  # goes up with each new user: connections of older ones are stale
        self._pools: list[asyncpg.Pool] = []

    async def lease_user(self) -> None:
        assert self.vault is not None
        self.user, self.password, self.lease = await self.vault.database_login()
        self.generation += 1

    async def connect(self, *_: Any, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg.connect with the current user and role; a pool's `connect=`."""
        if self.user is not None and self.password is not None:
            kwargs.update(user=self.user, password=self.password.reveal())
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
        conn = await asyncpg.connect(self.postgres.dsn.reveal(), **kwargs)
        if self.postgres.role:
            try:
                await conn.execute(f"SET ROLE {quote_ident(self.postgres.role)}")
            except BaseException:
                await conn.close()
                raise
        return conn

    def expired(self) -> bool:
        """The leased user's time is up (Vault drops it): nothing more can be committed."""
        return self.lease is not None and time.monotonic() >= self.lease.expires_at

    def watch(self, pool: asyncpg.Pool) -> asyncpg.Pool:
        """Replace this pool's connections whenever a new user is leased."""
        self._pools.append(pool)
        return pool

    async def keep_valid(self) -> None:
        """Until cancelled: renew the lease (and the Vault token) before they expire, and
        lease a new user when Vault will not extend the lease for long."""
        if self.vault is None or self.lease is None:
            return
        failures = 0
        while True:
            token = self.vault.token
            due = min(self.lease.renew_at(), token.renew_at() if token else float("inf"))
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                if await self.vault.keep_token():
                    # Vault revokes a token's leases when the token ends: move to a user
                    # leased with the new one while the old token still lasts.
                    await self._replace()
                elif time.monotonic() >= self.lease.renew_at():
                    await self._renew_or_replace()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - Vault away: try again before expiry
                failures += 1
                delay = RENEWAL_RETRY.delay(failures - 1)
                left = self.lease.expires_at - time.monotonic()
                log.warning(
                    "vault_renewal_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    lease_left_s=round(left, 1),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)

    async def _renew_or_replace(self) -> None:
        assert self.vault is not None
        assert self.lease is not None
        if self.lease.renewable:
            granted = await self.vault.renew(self.lease)
            if granted >= self.lease.duration_s:
                log.info("postgres_lease_renewed", user=self.user, ttl_s=granted)
                return
        await self._replace()

    async def _replace(self) -> None:
        old = self.user
        await self.lease_user()
        for pool in self._pools:
            await reconnect_idle(pool)
        log.info("postgres_login_replaced", old_user=old, user=self.user)

    async def close(self) -> None:
        """Revoke the current lease (its user is dropped); the sink's connections must be
        closed first."""
        if self.vault is None or self.lease is None:
            return
        try:
            await self.vault.revoke(self.lease)
        except Exception as exc:  # noqa: BLE001 - it ends at its TTL anyway
            log.warning("vault_revoke_failed", error=f"{type(exc).__name__}: {exc}")


def postgres_tls(postgres: PostgresConfig) -> ssl.SSLContext | str | None:
    """asyncpg's `ssl` argument for the CDC_POSTGRES__SSL* settings, with libpq's meaning of
    each sslmode; None when none is set (the DSN's own sslmode and files apply)."""
    if all(v is None for v in (postgres.sslmode, postgres.sslrootcert, postgres.sslcert)):
        return None
    mode = postgres.effective_sslmode()
    if mode in ("disable", "allow", "prefer"):
        return mode
    return client_context(
        "CDC_POSTGRES__SSLROOTCERT",
        postgres.sslrootcert,
        postgres.sslcert,
        postgres.sslkey,
        check_hostname=mode == "verify-full",
        verify=mode != "require",  # libpq's require encrypts without checking anything
    )


def postgres_unreachable(postgres: PostgresConfig, exc: BaseException) -> FatalError:
    """The error for a PostgreSQL connection that failed at start: names the settings."""
    if is_untrusted_certificate(exc):
        hint = untrusted_hint("PostgreSQL", "CDC_POSTGRES__SSLROOTCERT", postgres.sslrootcert)
        return FatalError(f"cannot connect to PostgreSQL: {hint}: {exc}", stage="postgres")
    return FatalError(f"cannot connect to PostgreSQL (CDC_POSTGRES__DSN): {exc}", stage="postgres")


async def reconnect_idle(pool: asyncpg.Pool) -> None:
    """Busy connections are replaced when handed back; idle ones only when next taken, which
    may be long after their user is gone: take each one now (the pool reconnects it as the
    new user) and hand it back."""
    await pool.expire_connections()
    taken = []
    try:
        for _ in range(pool.get_idle_size()):
            try:
                taken.append(await pool.acquire(timeout=5))
            except TimeoutError:
                break
    finally:
        for conn in taken:
            await pool.release(conn)


@contextlib.asynccontextmanager
async def secrets_for(config: Config) -> AsyncIterator[tuple[Config, PostgresLogin]]:
    """open_secrets for a short command: the leased user (if any) is revoked at the end."""
    config, login = await open_secrets(config)
    try:
        yield config, login
    finally:
        await login.close()


def _reading(setting: str, path: str, mount: str) -> str:
    """What open_secrets is doing while it reads the KV v2 secret a setting names."""
    return f"reading CDC_VAULT__{setting} {path!r} from KV v2 mount {mount!r}"


async def _kv_key(vault: Vault, path: str) -> Secret:
    """The `secret` field of a KV v2 secret: a key of at least 32 bytes (ValueError if not)."""
    key = (await vault.kv(path)).get("secret")
    if not isinstance(key, str) or len(key.encode()) < 32:
        raise ValueError("the secret must hold a `secret` of at least 32 bytes")
    return Secret(key)


async def open_secrets(config: Config) -> tuple[Config, PostgresLogin]:
    """Log in to Vault if the settings ask for a secret from it. Returns the configuration
    with Cassandra's credentials filled in, and how to log in to PostgreSQL. VaultError (a
    clear message, no traceback) if Vault cannot be reached or refuses."""
    cfg = config.vault
    if not cfg.used():
        return config, PostgresLogin(config)
    vault = Vault(cfg)
    step = f"logging in to Vault at {cfg.addr}" + (
        f" with AppRole (CDC_VAULT__ROLE_ID, mount {cfg.approle_mount!r})"
        if cfg.role_id
        else " with CDC_VAULT__TOKEN"
    )
    try:
        await vault.login()
        if cfg.cassandra_secret:
            step = _reading("CASSANDRA_SECRET", cfg.cassandra_secret, cfg.kv_mount)
            secret = await vault.kv(cfg.cassandra_secret)
            if not isinstance(secret.get("username"), str) or not secret.get("password"):
                raise ValueError("the secret must hold a username and a password")
            cassandra = dataclasses.replace(
                config.cassandra,
                username=secret["username"],
                password=Secret(str(secret["password"])),
            )
            config = dataclasses.replace(config, cassandra=cassandra)
        for setting, path, section, name in (
            ("API_JWT_SECRET", cfg.api_jwt_secret, "api", "jwt_secret"),
            ("GDPR_HASH_KEY", cfg.gdpr_hash_key, "gdpr", "hash_key"),
            ("MASKING_KEY_SECRET", cfg.masking_key_secret, "masking", "hash_key"),
        ):
            if path:
                step = _reading(setting, path, cfg.kv_mount)
                keyed = dataclasses.replace(
                    getattr(config, section), **{name: await _kv_key(vault, path)}
                )
                config = dataclasses.replace(config, **{section: keyed})
        login = PostgresLogin(config, vault)
        if cfg.postgres_role:
            step = (
                f"leasing PostgreSQL credentials for CDC_VAULT__POSTGRES_ROLE "
                f"{cfg.postgres_role!r} from mount {cfg.database_mount!r}"
            )
            await login.lease_user()
            assert login.lease is not None
            log.info("postgres_login_leased", user=login.user, ttl_s=login.lease.duration_s)
    except VaultError:
        raise
    except Exception as exc:  # hvac's errors, requests' connection errors, a bad answer
        said = " ".join(str(exc).split())  # hvac's messages run over several lines
        if is_untrusted_certificate(exc):
            said = f"{untrusted_hint('Vault', 'CDC_VAULT__SSL_CAFILE', cfg.ssl_cafile)}: {said}"
        raise VaultError(f"{step}: {type(exc).__name__}: {said}") from exc
    return config, login
