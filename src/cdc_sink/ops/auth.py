"""Bearer tokens for the control API: JWTs verified with PyJWT, and the scopes they grant.

HS256 with a shared secret (CDC_API__JWT_SECRET or from Vault KV), or RS256/ES256 with public
keys from a JWKS document (CDC_API__JWKS_URL or __JWKS_FILE). `exp` is required; `nbf`, and
`iss`/`aud` when configured, are checked with CDC_API__JWT_LEEWAY_S of clock skew. Scopes come
from the `scope` claim (space-separated, RFC 8693) or a `scp` list.

Keys from a JWKS are cached and read again (without blocking the loop) for a token whose `kid`
is not among them, at most once per JWKS_REFRESH_INTERVAL_S: made-up kids cannot hammer the
key server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jwt
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cdc_sink.config import ApiConfig, Secret
from cdc_sink.errors import FatalError
from cdc_sink.ops.http import ApiError

__all__ = [
    "ANONYMOUS",
    "ERASE",
    "PAYLOAD",
    "READ",
    "WRITE",
    "Authenticator",
    "Principal",
    "TokenError",
    "require",
]

READ = "cdc:read"  # jobs, mismatches' and dead letters' metadata
PAYLOAD = "cdc:payload"  # record payloads (personal data)
WRITE = "cdc:write"  # replay, resume, new jobs, resolutions
ERASE = "cdc:erase"  # GDPR erasure of a key
SCOPES = (READ, PAYLOAD, WRITE, ERASE)
ASYMMETRIC = ["RS256", "ES256"]
JWKS_REFRESH_INTERVAL_S = 1.0
JWKS_TIMEOUT_S = 5.0
# Reads the Authorization header (and shows the scheme in /docs); the checks are ours.
_BEARER = Depends(HTTPBearer(auto_error=False))


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's `sub`, and the scopes it grants."""

    subject: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))  # authentication off (loopback only)


class TokenError(Exception):
    """The token is missing, malformed, expired, not yet valid, for another issuer or
    audience, or signed with an unknown or wrong key; the message says which."""


class JwksKeys:
    """Public keys by kid from a JWKS file or URL, read again when a kid is unknown."""

    def __init__(self, *, url: str | None = None, file: str | None = None) -> None:
        self._url, self._file = url, file
        self._keys: dict[str, jwt.PyJWK] = {}
        self._read_at = -JWKS_REFRESH_INTERVAL_S
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the set (at start-up); FatalError naming the setting if it cannot be read."""
        try:
            await self._refresh()
        except (OSError, ValueError, httpx.HTTPError, jwt.PyJWKSetError) as exc:
            setting = "CDC_API__JWKS_URL" if self._url else "CDC_API__JWKS_FILE"
            raise FatalError(f"cannot read the JWKS of {setting}: {exc}", stage="api") from exc

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key `kid` names (the only key when the token names none); TokenError if the
        set does not have it even after being read again."""
        found = self._pick(kid)
        if found is None:
            async with self._lock:
                found = self._pick(kid)
                if found is None and time.monotonic() - self._read_at >= JWKS_REFRESH_INTERVAL_S:
                    try:
                        await self._refresh()
                    except (OSError, ValueError, httpx.HTTPError, jwt.PyJWKSetError) as exc:
                        raise TokenError(f"the signing keys cannot be read: {exc}") from exc
                    found = self._pick(kid)
        if found is None:
            raise TokenError(f"unknown signing key {kid!r}")
        return found

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._read_at = time.monotonic()
        if self._url:
            async with httpx.AsyncClient(timeout=JWKS_TIMEOUT_S) as client:
                answer = await client.get(self._url)
                answer.raise_for_status()
                document = answer.json()
        else:
            assert self._file is not None
            document = json.loads(await asyncio.to_thread(Path(self._file).read_text))
        keys = jwt.PyJWKSet.from_dict(document).keys
        self._keys = {key.key_id or "": key for key in keys}


class Authenticator:
    """Verifies bearer tokens against the configured key(s); `None` config: no checks."""

    def __init__(self, config: ApiConfig, secret: Secret | None) -> None:
        self._config = config
        self._secret = secret
        self._jwks = (
            JwksKeys(url=config.jwks_url, file=config.jwks_file)
            if config.jwks_url or config.jwks_file
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._secret is not None or self._jwks is not None

    async def start(self) -> None:
        """Read the JWKS once, so a wrong setting stops start-up (FatalError)."""
        if self._jwks is not None:
            await self._jwks.load()

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; TokenError otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        key: Any
        if self._jwks is not None:
            key, algorithms = await self._jwks.key(header.get("kid")), ASYMMETRIC
        else:
            assert self._secret is not None
            key, algorithms = self._secret.reveal(), ["HS256"]
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=cfg.jwt_audience,
                issuer=cfg.jwt_issuer,
                leeway=cfg.jwt_leeway_s,
                options={"require": ["exp"], "verify_aud": cfg.jwt_audience is not None},
            )
        except jwt.InvalidTokenError as exc:
            raise TokenError(str(exc) or type(exc).__name__) from None
        return Principal(str(claims.get("sub") or "unknown"), frozenset(_scopes(claims)))


def _scopes(claims: dict[str, Any]) -> list[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    scp = claims.get("scp")
    if isinstance(scp, list):
        return [s for s in scp if isinstance(s, str)]
    return []


def _unauthorized(message: str) -> ApiError:
    challenge = f'Bearer error="invalid_token", error_description="{_header_safe(message)}"'
    return ApiError(401, message, {"WWW-Authenticate": challenge})


def require(authenticator: Authenticator, scope: str) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the request's principal if its bearer token is valid and grants
    `scope`; 401 with WWW-Authenticate if the token is missing or invalid, 403 if it lacks
    the scope. With authentication off every request is ANONYMOUS."""

    async def principal(
        credentials: HTTPAuthorizationCredentials | None = _BEARER,
    ) -> Principal:
        if not authenticator.enabled:
            return ANONYMOUS
        if credentials is None or not credentials.credentials.strip():
            raise ApiError(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            found = await authenticator.verify(credentials.credentials.strip())
        except TokenError as exc:
            raise _unauthorized(str(exc)) from None
        if scope not in found.scopes:
            raise ApiError(
                403,
                f"the token does not grant {scope}",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return found

    return principal


def _header_safe(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in '"\\')[:200]
