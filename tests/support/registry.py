"""The stack's schema registry beyond the Confluent API: schemas its Avro parser would refuse."""

from __future__ import annotations

import httpx2 as httpx
import pytest


def store_without_validation(ccompat_url: str, artifact_id: str, text: str) -> int:
    """Store Avro text through Apicurio's v3 API, which parses nothing without a validity
    rule, and return the id its Confluent-compatible API serves it under (the content id)."""
    base, found, _ = ccompat_url.partition("/apis/ccompat/")
    if not found:
        pytest.skip("only Apicurio's native API can store a schema its Avro parser rejects")
    body = {
        "artifactId": artifact_id,
        "artifactType": "AVRO",
        "firstVersion": {"content": {"content": text, "contentType": "application/json"}},
    }
    with httpx.Client(timeout=30) as http:
        created = http.post(f"{base}/apis/registry/v3/groups/default/artifacts", json=body)
    created.raise_for_status()
    content_id: int = created.json()["version"]["contentId"]
    return content_id
