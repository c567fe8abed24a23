"""How deeply the JSON documents the sink takes in may nest. Pure.

Parsing, comparing, printing and walking nested lists and dicts all recurse, and a document
nested about as deeply as the interpreter's stack allows makes any of them raise RecursionError,
wherever it happens to be. Documents the sink walks by their shape (schemas, API bodies) are
held to MAX_NESTING levels as soon as they are parsed; a record's own values are checked only
when a stage ran out of stack on them, to tell bad input from a defect.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_NESTING", "deeper_than"]

MAX_NESTING = 100
"""Levels of lists and dicts ({"a": [1]} is two). A Debezium envelope whose column is a list of
maps of a UDT holding a tuple takes 26 in Avro schema form."""


def deeper_than(value: Any, levels: int = MAX_NESTING) -> bool:
    """Whether lists and dicts nest more than `levels` deep in `value`. Iterative, so that it
    cannot run out of stack itself; stops at the first level too many."""
    if not isinstance(value, dict | list):
        return False
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth >= levels:
                    return True
                pending.append((child, depth + 1))
    return False
