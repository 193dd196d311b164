"""Every Redis key name, in one place.

All keys of one model share the hash tag `{<model name>}` so that, on a Redis Cluster, they live
in one slot and multi-key operations and transactions on one model stay legal. Model names are
validated by the manifest (letters, digits, `_.-`), so they never contain braces.
"""

from __future__ import annotations

PREFIX = "edgeharvest"


def model_tag(model: str) -> str:
    return f"{{{model}}}"


def event_stream(model: str, version: str) -> str:
    """The Redis Stream of prediction events of one model version."""
    return f"{PREFIX}:{model_tag(model)}:{version}:events"
