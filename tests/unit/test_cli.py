"""The command line answers --help and version without any service."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from cdc_sink import __version__
from cdc_sink.cli import GC_YOUNG_THRESHOLD, build_parser, main, tune_gc


def test_version_command_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`version` prints the installed distribution's version and exits 0."""
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cdc-sink {__version__} ")
    assert __version__ != "0.0.0+unknown"


def test_help_lists_commands_through_python_m() -> None:
    """`python -m cdc_sink --help` runs as a module and lists the subcommands."""
    done = subprocess.run(
        [sys.executable, "-m", "cdc_sink", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "version" in done.stdout
    assert "usage: python -m cdc_sink" in done.stdout


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand exits with argparse's usage error code 2."""
    with pytest.raises(SystemExit) as exited:
        main(["frobnicate"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "show", str(2**64)], "argument id: must be between 1 and 9223372036854775807"),
        (["dlq", "list", "--limit", "-1"], "argument --limit: must be between 1 and"),
        (["dlq", "list", "--after-id", "x"], "argument --after-id: not a whole number: 'x'"),
        (["dlq", "replay", "0"], "argument ids: must be between 1 and"),
        (["reconcile", "repair", "--job", "1.5"], "argument --job: not a whole number: '1.5'"),
        (
            ["reconcile", "run", "--table", "t", "--strategy", "sample", "--sample-size", "0"],
            "argument --sample-size: must be between 1 and",
        ),
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids and limits are checked before any service is asked (PostgreSQL would refuse them
    with a traceback)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    """The worker's GC tuning moves start-up objects out of collections and collects rarely."""
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_an_unusable_ca_bundle_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA bundle that is not PEM stops a command with exit 2, naming the setting."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    monkeypatch.setenv("CDC_POSTGRES__SSLMODE", "verify-full")
    monkeypatch.setenv("CDC_POSTGRES__SSLROOTCERT", str(bundle))
    assert main(["migrate"]) == 2
    assert "CDC_POSTGRES__SSLROOTCERT: cannot load the CA bundle" in capsys.readouterr().err
