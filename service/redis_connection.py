"""Redis clients from a URL: bounded pools and timeouts so a dead Redis never hangs a caller.

URLs: `redis://[user:password@]host:port/db`, `rediss://...` (TLS), `unix:///path/redis.sock`.
`?cluster=true` in the query (or `cluster=True`) asks for a Redis Cluster client instead.

Commands are not retried by the client: a retried pipeline of XADDs could be applied twice, and
the callers that write (the event log) retry with their own backoff and accounting.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import NoBackoff

SyncRedis = redis.Redis | redis.cluster.RedisCluster
AsyncRedis = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def split_cluster_flag(url: str) -> tuple[str, bool | None]:
    """Remove `cluster=` from the query (redis-py would pass it on to the connection)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value for key, value in query if key == "cluster"]
    if not flags:
        return url, None
    value = flags[-1].strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"Redis URL option cluster='{flags[-1]}' is not a boolean (true/false)")
    rest = urlencode([(key, v) for key, v in query if key != "cluster"])
    return urlunsplit(parts._replace(query=rest)), value in _TRUE


def _connection_kwargs(
    socket_timeout: float,
    socket_connect_timeout: float | None,
    health_check_interval: float,
    retry: redis.retry.Retry | redis.asyncio.retry.Retry,
) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout or socket_timeout,
        "health_check_interval": health_check_interval,
        "retry": retry,
    }


def create_redis(
    url: str,
    *,
    max_connections: int = 16,
    socket_timeout: float = 2.0,
    socket_connect_timeout: float | None = None,
    health_check_interval: float = 30.0,
    retries: int = 0,
    cluster: bool | None = None,
) -> SyncRedis:
    """A synchronous client. `cluster=None` follows the URL's `cluster=` option.

    A cluster client connects to discover the nodes on creation; a plain one on first use.
    """
    url, url_cluster = split_cluster_flag(url)
    kwargs = _connection_kwargs(
        socket_timeout,
        socket_connect_timeout,
        health_check_interval,
        redis.retry.Retry(NoBackoff(), retries),
    )
    if url_cluster if cluster is None else cluster:
        return redis.cluster.RedisCluster.from_url(url, max_connections=max_connections, **kwargs)
    # A blocking pool waits (up to the socket timeout) for a free connection instead of
    # opening more than max_connections or failing at once under a burst.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout, **kwargs
    )
    return redis.Redis.from_pool(pool)


def create_async_redis(
    url: str,
    *,
    max_connections: int = 16,
    socket_timeout: float = 2.0,
    socket_connect_timeout: float | None = None,
    health_check_interval: float = 30.0,
    retries: int = 0,
    cluster: bool | None = None,
) -> AsyncRedis:
    """An asyncio client; it connects on first use. `cluster=None` follows the URL."""
    url, url_cluster = split_cluster_flag(url)
    # The asyncio client's own Retry: redis-py 6+ converts a synchronous one, with a warning.
    kwargs = _connection_kwargs(
        socket_timeout,
        socket_connect_timeout,
        health_check_interval,
        redis.asyncio.retry.Retry(NoBackoff(), retries),
    )
    if url_cluster if cluster is None else cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(
            url, max_connections=max_connections, **kwargs
        )
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout, **kwargs
    )
    return redis.asyncio.Redis.from_pool(pool)
