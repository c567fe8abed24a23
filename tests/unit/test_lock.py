"""requirements.lock (`make lock`) pins exactly pyproject's runtime dependencies, with hashes."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.stack import REPO

DIRECT = "cdc-sink (pyproject.toml)"  # how the lock tool names a dependency pyproject asks for


@dataclass
class Pin:
    version: Version
    hashes: int = 0
    via: set[str] = field(default_factory=set)


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a `uv pip compile --generate-hashes` file: version, hash count, and what
    each was required by (its `# via` annotations)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = pins[canonicalize_name(match[1])] = Pin(Version(match[2]))
        elif current and line.strip().startswith("--hash=sha256:"):
            current.hashes += 1
        elif current and (match := re.match(r"^\s+#(?:\s+via)?\s+(\S.*)$", line)):
            current.via.add(match[1].strip())
    return pins


def lock_drift(pyproject: str, lock: str) -> list[str]:
    """How the lock disagrees with pyproject's [project] dependencies (empty: it agrees)."""
    wanted = {
        canonicalize_name(req.name): req
        for req in map(Requirement, tomllib.loads(pyproject)["project"]["dependencies"])
    }
    pins = parse_lock(lock)
    direct = {name for name, pin in pins.items() if DIRECT in pin.via}
    problems = [
        f"{name}: in pyproject, not locked as its dependency" for name in wanted.keys() - direct
    ]
    problems += [f"{name}: locked, not in pyproject" for name in direct - wanted.keys()]
    problems += [
        f"{name}: locked {pins[name].version}, pyproject asks {req.specifier}"
        for name, req in wanted.items()
        if name in pins and not req.specifier.contains(pins[name].version, prereleases=True)
    ]
    problems += [f"{name}: no hash" for name, pin in pins.items() if not pin.hashes]
    return problems


def test_the_lock_pins_exactly_the_runtime_dependencies_with_hashes() -> None:
    """Every runtime dependency of pyproject.toml, and no other, is locked at a version its
    bounds allow, every pin has hashes, and confluent-kafka (only the tools' client) is not
    among them: after a change of the dependencies, `make lock` has to be run."""
    lock = (REPO / "requirements.lock").read_text()
    assert lock_drift((REPO / "pyproject.toml").read_text(), lock) == []
    assert "confluent-kafka" not in parse_lock(lock)


def test_drift_is_reported() -> None:
    """A dependency added to or dropped from pyproject, or a bound the pin no longer meets, is
    named; so is a pin without hashes."""
    lock = """\
aiokafka==0.14.0 \\
    --hash=sha256:00
    # via cdc-sink (pyproject.toml)
cramjam==2.14.0 \\
    --hash=sha256:11
    # via
    #   aiokafka
    #   cdc-sink (pyproject.toml)
six==1.17.0
    # via cdc-sink (pyproject.toml)
"""
    pyproject = """\
[project]
dependencies = ["aiokafka[lz4]>=0.15", "cramjam>=2.8", "structlog>=24.1"]
"""
    assert sorted(lock_drift(pyproject, lock)) == [
        "aiokafka: locked 0.14.0, pyproject asks >=0.15",
        "six: locked, not in pyproject",
        "six: no hash",
        "structlog: in pyproject, not locked as its dependency",
    ]
