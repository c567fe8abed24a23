"""The Kafka topics a test run leaves behind, removed when it ends.

Tests name their topics (and the groups that name DLQ topics) with `unique_name`, whose suffix
starts with a token of this run, and never delete them one by one. A stack reused over many runs
would gather thousands of partitions, and Kafka then takes minutes to restart (longer than the
chaos tests allow) and serves every client more slowly. Only names with this run's token are
deleted, so a run never removes another's topics, even one going on at the same time.
"""

from __future__ import annotations

import asyncio
import re
import uuid
import warnings

from aiokafka.errors import KafkaError

from cdc_synth import synth

RUN_TOKEN = uuid.uuid4().hex[:4]
OURS = re.compile(rf"_{RUN_TOKEN}[0-9a-f]{{8}}")


def unique_name(prefix: str) -> str:
    """A name no other test or run uses: prefix, this run's token, eight random hex digits."""
    return f"{prefix}_{RUN_TOKEN}{uuid.uuid4().hex[:8]}"


def remove_this_runs_topics(bootstrap: str) -> list[str]:
    """Delete the topics this run's tests made; return their names. Other names (another
    run's, the demo's, a benchmark's) are left alone."""
    try:
        return asyncio.run(synth.delete_topics(bootstrap, lambda name: bool(OURS.search(name))))
    except (KafkaError, OSError, TimeoutError) as exc:  # the run's result stands without it
        warnings.warn(f"could not remove the run's Kafka topics: {exc!r}", stacklevel=2)
        return []
