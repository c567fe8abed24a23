"""The tools that check deploy/helm and deploy/compose, as `deploy/tools/install` caches them:
helm and docker compose built from their Go modules, kubernetes-validate and checkov from PyPI,
and the CRDs of the Prometheus Operator and KEDA."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.stack import REPO

INSTALL = REPO / "deploy" / "tools" / "install"


@dataclass(frozen=True)
class DeployTools:
    helm: Path
    docker_compose: Path
    kubernetes_validate: Path
    checkov: Path
    crds: Path


def install_deploy_tools() -> DeployTools:
    """Run the installer (quick once everything is cached; `make deploy-tools` runs it before the
    tests) and read where it put each tool. Fails the test, never skips it, if it cannot."""
    done = subprocess.run([INSTALL], capture_output=True, text=True, timeout=3000, check=False)
    if done.returncode != 0:
        pytest.fail(f"{INSTALL} exited {done.returncode}:\n{done.stderr}", pytrace=False)
    paths = dict(
        line.split("=", 1)
        for line in (Path(done.stdout.strip()) / "paths.env").read_text().splitlines()
        if "=" in line
    )
    return DeployTools(
        helm=Path(paths["HELM"]),
        docker_compose=Path(paths["DOCKER_COMPOSE"]),
        kubernetes_validate=Path(paths["KUBERNETES_VALIDATE"]),
        checkov=Path(paths["CHECKOV"]),
        crds=Path(paths["CRDS"]),
    )


def run(
    argv: list[str | Path], cwd: Path = REPO, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a checking tool (with `env` added to the environment); the caller looks at its exit
    code and output."""
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def run_ok(argv: list[str | Path], cwd: Path = REPO) -> str:
    """Run a checking tool; fail the test with its whole output unless it exits 0."""
    done = run(argv, cwd)
    if done.returncode != 0:
        command = " ".join(str(arg) for arg in argv)
        pytest.fail(f"`{command}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout
