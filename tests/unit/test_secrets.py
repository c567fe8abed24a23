"""When a leased PostgreSQL login is renewed, replaced or retried (the real Vault is in
tests/integration/test_vault.py; here a stand-in answers with chosen lease times)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cdc_sink.config import Secret, load_config
from cdc_sink.ops.secrets import Lease, PostgresLogin


class StandInVault:
    """Grants leases of `duration` s; renewals grant what `renewals` says, in turn (an
    exception instance is raised instead)."""

    def __init__(self, duration: float, renewals: list[Any]) -> None:
        self.duration = duration
        self.renewals = renewals
        self.token: Lease | None = None
        self.leased = 0
        self.calls: list[str] = []

    async def keep_token(self) -> bool:
        return False  # a token that does not expire

    async def database_login(self) -> tuple[str, Secret, Lease]:
        self.leased += 1
        self.calls.append(f"lease {self.leased}")
        return f"user{self.leased}", Secret("pw"), Lease.granted("id", self.duration, True)

    async def renew(self, lease: Lease) -> float:
        answer = self.renewals.pop(0) if self.renewals else self.duration
        self.calls.append(f"renew {answer!r}")
        if isinstance(answer, Exception):
            raise answer
        lease.expires_at = time.monotonic() + answer
        return float(answer)


class StandInPool:
    def __init__(self) -> None:
        self.expired = 0

    async def expire_connections(self) -> None:
        self.expired += 1


async def keep_for(login: PostgresLogin, seconds: float) -> None:
    task = asyncio.create_task(login.keep_valid())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def started(vault: StandInVault) -> tuple[PostgresLogin, StandInPool]:
    login = PostgresLogin(load_config({}), vault)  # type: ignore[arg-type]
    await login.lease_user()
    pool = StandInPool()
    login.watch(pool)  # type: ignore[arg-type]
    return login, pool


async def test_a_lease_vault_extends_in_full_is_renewed_and_the_user_kept() -> None:
    vault = StandInVault(0.3, renewals=[0.3, 0.3, 0.3])
    login, pool = await started(vault)
    await keep_for(login, 0.75)  # renewals at ~0.2, ~0.4, ~0.6 s
    assert vault.calls[:3] == ["lease 1", "renew 0.3", "renew 0.3"]
    assert (login.user, login.generation, pool.expired) == ("user1", 1, 0)


async def test_a_lease_near_its_max_ttl_is_replaced_by_a_new_user_and_the_pools_told() -> None:
    vault = StandInVault(0.3, renewals=[0.1])  # less than half: the max TTL is near
    login, pool = await started(vault)
    await keep_for(login, 0.3)
    assert vault.calls[:3] == ["lease 1", "renew 0.1", "lease 2"]
    assert (login.user, login.generation, pool.expired) == ("user2", 2, 1)


async def test_vault_not_answering_a_renewal_is_retried_until_it_does() -> None:
    vault = StandInVault(3.0, renewals=[ConnectionError("refused"), 3.0])
    login, _ = await started(vault)
    assert login.lease is not None
    login.lease.expires_at -= 2.5  # due now
    await keep_for(login, 1.5)  # the retry comes 1 s after the failure
    assert vault.calls[:3] == ["lease 1", "renew ConnectionError('refused')", "renew 3.0"]
    assert login.user == "user1"
