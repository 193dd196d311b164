"""Redis clients from a URL, against a real server."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from service.redis_connection import create_async_redis, create_redis, split_cluster_flag


def test_the_asyncio_client_is_created_and_answers_without_warnings(redis_url: str) -> None:
    async def ping() -> bool:
        client = create_async_redis(redis_url)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    with warnings.catch_warnings():
        # redis-py 6+ warns when an asyncio client is given a synchronous Retry.
        warnings.simplefilter("error")
        assert asyncio.run(ping()) is True


def test_the_synchronous_client_is_created_and_answers_without_warnings(redis_url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = create_redis(redis_url)
        try:
            assert client.ping() is True
        finally:
            client.close()


def test_the_cluster_option_is_taken_out_of_the_url() -> None:
    assert split_cluster_flag("redis://h:1/0?cluster=true&x=1") == ("redis://h:1/0?x=1", True)
    assert split_cluster_flag("redis://h:1/0?cluster=no") == ("redis://h:1/0", False)
    assert split_cluster_flag("redis://h:1/0") == ("redis://h:1/0", None)
    with pytest.raises(ValueError, match="cluster='maybe' is not a boolean"):
        split_cluster_flag("redis://h:1/0?cluster=maybe")
