"""The stack's Vault (OpenBao) set up as a production deployment would use it for the sink:
PostgreSQL logins leased from a database secrets engine, an AppRole login, a KV secret."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import hvac

from tests.support.stack import Endpoints


@dataclass
class LeasedPostgres:
    settings: dict[str, str]  # CDC_* settings of a worker logging in through Vault
    schema: str  # owned by `owner`, where the worker may create what it needs
    owner: str  # the NOLOGIN role each leased user is a member of and SETs ROLE to
    cassandra_secret: str  # a KV v2 path (mount "secret") the AppRole may read
    client: hvac.Client  # root: for what a test checks or changes in Vault


def root_client(stack: Endpoints) -> hvac.Client:
    return hvac.Client(url=stack.vault_addr, token=stack.vault_token)


@asynccontextmanager
async def leased_postgres(
    stack: Endpoints,
    unique: Callable[[str], str],
    *,
    ttl_s: int,
    max_ttl_s: int,
    token_ttl_s: int = 3600,
    token_max_ttl_s: int = 7200,
) -> AsyncIterator[LeasedPostgres]:
    """A database secrets engine leasing PostgreSQL users (ttl_s, at most max_ttl_s), an
    AppRole allowed to lease and renew them (its tokens last token_ttl_s, renewable up to
    token_max_ttl_s), and a schema those users' group role owns. Everything is removed at the
    end (disabling the engine revokes its leases)."""
    client = root_client(stack)
    mount, approle, role = unique("db"), unique("approle"), unique("sink")
    owner, schema, policy = unique("owner"), unique("vault"), unique("cdc-sink")
    cassandra_secret = unique("cassandra")
    admin_dsn = stack["CDC_STACK_POSTGRES_ADMIN_DSN"]
    admin_url = urlsplit(admin_dsn)
    # Where Vault reaches PostgreSQL: the same address, unless both run in containers.
    postgres_from_vault = stack.values.get(
        "CDC_STACK_POSTGRES_FROM_VAULT", f"{admin_url.hostname}:{admin_url.port}"
    )
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(
            f'CREATE ROLE "{owner}" NOLOGIN; CREATE SCHEMA "{schema}" AUTHORIZATION "{owner}"'
        )

        def configure() -> dict[str, str]:
            client.sys.enable_secrets_engine("database", path=mount)
            client.secrets.database.configure(
                name="pg",
                plugin_name="postgresql-database-plugin",
                connection_url=(
                    f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres_from_vault}"
                    f"{admin_url.path}"
                ),
                username=admin_url.username,
                password=admin_url.password,
                allowed_roles=[role],
                mount_point=mount,
            )
            client.secrets.database.create_role(
                name=role,
                db_name="pg",
                creation_statements=[
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                    f"VALID UNTIL '{{{{expiration}}}}' IN ROLE \"{owner}\""
                ],
                revocation_statements=['DROP ROLE IF EXISTS "{{name}}"'],
                default_ttl=ttl_s,
                max_ttl=max_ttl_s,
                mount_point=mount,
            )
            client.sys.create_or_update_policy(
                policy,
                f'path "{mount}/creds/{role}" {{ capabilities = ["read"] }}\n'
                'path "sys/leases/renew" { capabilities = ["update"] }\n'
                'path "sys/leases/revoke" { capabilities = ["update"] }\n'
                f'path "secret/data/{cassandra_secret}" {{ capabilities = ["read"] }}\n',
            )
            client.sys.enable_auth_method("approle", path=approle)
            client.auth.approle.create_or_update_approle(
                role,
                token_policies=[policy],
                token_ttl=f"{token_ttl_s}s",
                token_max_ttl=f"{token_max_ttl_s}s",
                mount_point=approle,
            )
            role_id = client.auth.approle.read_role_id(role, mount_point=approle)["data"]
            secret = client.auth.approle.generate_secret_id(role, mount_point=approle)["data"]
            return {
                "CDC_VAULT__ROLE_ID": role_id["role_id"],
                "CDC_VAULT__SECRET_ID": secret["secret_id"],
                "CDC_VAULT__APPROLE_MOUNT": approle,
                "CDC_VAULT__POSTGRES_ROLE": role,
                "CDC_VAULT__DATABASE_MOUNT": mount,
                "CDC_VAULT__TOKEN": "",
                "CDC_POSTGRES__ROLE": owner,
                "CDC_POSTGRES__SCHEMA": schema,
                # Only a login from Vault can work: the DSN's user does not exist.
                "CDC_POSTGRES__DSN": admin_url._replace(
                    netloc=f"nobody:wrong@{admin_url.hostname}:{admin_url.port}"
                ).geturl(),
            }

        settings = await asyncio.to_thread(configure)
        yield LeasedPostgres(settings, schema, owner, cassandra_secret, client)
    finally:

        def remove() -> None:
            client.sys.disable_secrets_engine(mount)  # revokes every lease: drops the users
            client.sys.disable_auth_method(approle)
            client.sys.delete_policy(policy)

        await asyncio.to_thread(remove)
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; DROP ROLE "{owner}"')
        await admin.close()
