"""Secret: the plaintext comes out through reveal() and nothing else."""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle

import pytest
import structlog

from cdc_sink.config import Secret

PLAIN = "s3cret-value"


def test_reveal_is_the_only_way_to_the_plaintext() -> None:
    """reveal() returns the value; str, repr, f-strings and %-formatting show ***."""
    secret = Secret(PLAIN)
    assert secret.reveal() == PLAIN
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r}", f"{secret:>20}"]
    shown.append("%s" % secret)  # noqa: UP031 - %-formatting is what logging does
    assert all(PLAIN not in text for text in shown)
    assert str(secret) == "***"


@pytest.mark.parametrize(
    "use",
    [
        lambda s: s + "",
        lambda s: "" + s,
        lambda s: s[0:4],
        lambda s: s.upper(),
        lambda s: s.encode(),
        lambda s: "".join([s]),
        lambda s: s * 2,
    ],
    ids=["add", "radd", "slice", "upper", "encode", "join", "repeat"],
)
def test_string_operations_fail_instead_of_leaking(use: object) -> None:
    """A Secret is no str: concatenation, slicing and string methods raise."""
    with pytest.raises((TypeError, AttributeError)):
        use(Secret(PLAIN))  # type: ignore[operator]


def test_logs_and_json_show_it_masked() -> None:
    """stdlib logging, structlog's JSON renderer and json.dumps(default=str) print ***."""
    secret = Secret(PLAIN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_secret")
    logger.addHandler(handler)
    try:
        logger.warning("password=%s %r", secret, secret)
    finally:
        logger.removeHandler(handler)
    rendered = structlog.processors.JSONRenderer()(None, "info", {"event": "e", "pw": secret})
    dumped = json.dumps({"pw": secret}, default=str)
    for text in (stream.getvalue(), rendered, dumped):
        assert PLAIN not in text
        assert "***" in text


def test_it_compares_copies_and_pickles_by_value_and_is_immutable() -> None:
    """Equal secrets compare equal; copies and pickles keep the value; it cannot be changed."""
    secret = Secret(PLAIN)
    assert secret == Secret(PLAIN)
    assert secret != Secret("other")
    assert secret != PLAIN  # never equal to its plaintext: no guessing by comparison
    assert copy.deepcopy(secret).reveal() == PLAIN
    assert pickle.loads(pickle.dumps(secret)).reveal() == PLAIN  # noqa: S301 - our own bytes
    assert bool(secret)
    assert not Secret("")
    with pytest.raises(AttributeError):
        secret._value = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Secret(42)  # type: ignore[arg-type]
