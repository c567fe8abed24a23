"""The runtime wheel: built from the source tree, installed alone in a fresh venv, it migrates."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.support.names import Unique
from tests.support.stack import REPO, Endpoints

MIGRATIONS = sorted(path.name for path in (REPO / "sql").glob("[0-9][0-9][0-9]_*.sql"))
CONTROL_TABLES = {
    name
    for migration in MIGRATIONS
    for name in re.findall(
        r"CREATE TABLE IF NOT EXISTS (\w+)", (REPO / "sql" / migration).read_text()
    )
}

# Every module of the wheel imports with the declared dependencies, and none needs the
# demo's librdkafka client.
IMPORT_EVERY_MODULE = """
import importlib, importlib.util, pkgutil, cdc_sink, cdc_recon
for package in (cdc_sink, cdc_recon):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
assert importlib.util.find_spec("confluent_kafka") is None, "confluent_kafka is installed"
assert importlib.util.find_spec("cdc_synth") is None, "cdc_synth is installed"
print(cdc_sink.__file__)
"""


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    home: Path  # working directory outside the source tree


def _run(
    argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run without the test's PYTHONPATH (nothing of the source tree is importable) and CDC_*
    settings (CDC_SQL_DIR would hide the shipped migrations): only `env` configures it."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith("CDC_")
    }
    done = subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env={**inherited, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from a copy of the source tree, installed with its declared
    dependencies (from the package index) in a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "sql"):  # src/cdc_sink/migrations stays a link to sql/
        shutil.copytree(REPO / name, tree / name, symlinks=True, ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", tree], root)
    (wheel,) = (root / "dist").glob("cdc_sink-*.whl")
    _run([sys.executable, "-m", "venv", root / "venv"], root)
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel], root)
    return Installed(wheel, python, root)


def test_wheel_ships_the_migrations_and_not_the_generator(installed: Installed) -> None:
    """The wheel holds every sql/ migration under cdc_sink/migrations and no cdc_synth."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    shipped = sorted(name.rsplit("/", 1)[1] for name in names if name.endswith(".sql"))
    assert shipped == MIGRATIONS
    assert all(name.startswith("cdc_sink/migrations/") for name in names if name.endswith(".sql"))
    assert not [name for name in names if name.startswith("cdc_synth")]


def test_every_runtime_module_imports_in_a_fresh_venv(installed: Installed) -> None:
    """cdc_sink and cdc_recon import from the installed wheel with only its declared
    dependencies; confluent_kafka and cdc_synth are not among them."""
    done = _run([installed.python, "-c", IMPORT_EVERY_MODULE], installed.home)
    assert done.stdout.strip().startswith(str(installed.home / "venv"))


async def test_installed_wheel_migrates(
    installed: Installed, stack: Endpoints, unique: Unique
) -> None:
    """`python -m cdc_sink migrate` from the installed wheel creates every control table sql/
    defines in a fresh schema and records every migration."""
    schema = unique.schema("wheel")
    env = {"CDC_POSTGRES__DSN": stack.postgres_dsn, "CDC_POSTGRES__SCHEMA": schema}
    argv: list[str | Path] = [installed.python, "-m", "cdc_sink", "migrate"]
    done = await asyncio.to_thread(_run, argv, installed.home, env)
    assert "applied: 001_control_tables" in done.stdout
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        applied = await conn.fetch(
            f'SELECT version FROM "{schema}"._cdc_migrations ORDER BY version'
        )
    finally:
        await conn.close()
    assert len(CONTROL_TABLES) >= 6
    assert {row["tablename"] for row in tables} == {*CONTROL_TABLES, "_cdc_migrations"}
    assert [f"{row['version']}.sql" for row in applied] == MIGRATIONS
