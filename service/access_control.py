"""The outermost ASGI layer: API keys and roles, a concurrency limit, and a request timeout.

It sits in front of everything (the prediction fast path included), so no endpoint escapes it.
- Authentication: see `auth.py`; 401 without a valid key, 403 without the role.
- Concurrency: more than `max_concurrent_requests` requests in flight get an immediate 503 with
  `Retry-After`, instead of queueing without bound. Health and metrics are never refused, so an
  overloaded replica is not also declared dead.
- Timeout: a request that has not started its response after `request_timeout_seconds` is
  cancelled and answered 504. A response that has started (a streaming export) is not cut.
"""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import OPEN, KeyRing, presented_key, required
from service.http_body import send_body

logger = logging.getLogger("edgeharvest")


async def send_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps({"error": message})
    await send_body(send, status, body, [(b"content-type", b"application/json"), *(headers or [])])


# Paths repeat (the same models, the same endpoints); item ids make the set open, so bounded.
_required = lru_cache(maxsize=4096)(required)


class AccessControl:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        *,
        max_concurrent_requests: int,
        request_timeout_seconds: float,
        protect_observability: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_concurrent = max_concurrent_requests
        self.timeout = request_timeout_seconds
        self.protect_observability = protect_observability
        self.in_flight = 0
        # Requests whose response has not started, by task: when they time out.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._resolution = max(0.01, min(0.5, request_timeout_seconds / 10))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        requirement = _required(scope["method"], scope["path"], self.protect_observability)
        if self.keys.enabled and requirement != OPEN:
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in scope["headers"]
                if name in (b"authorization", b"x-api-key")
            }
            decision = self.keys.decide(requirement, presented_key(headers))
            if not decision.allowed:
                challenge = [(b"www-authenticate", b"Bearer")] if decision.status == 401 else []
                await send_error(send, decision.status, decision.message, challenge)
                return
        if requirement == OPEN:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            await send_error(
                send,
                503,
                f"the server is at its limit of {self.max_concurrent} concurrent requests "
                "(EDGEHARVEST_MAX_CONCURRENT_REQUESTS); retry after the Retry-After delay",
                [(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self._with_timeout(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _with_timeout(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + self.timeout
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch(), name="edgeharvest-request-timeouts")

        async def send_and_track(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._deadlines.pop(task, None)  # a started response is never cut
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            task.uncancel()
            logger.warning("%s %s timed out", scope["method"], scope["path"])
            await send_error(
                send,
                504,
                f"the request did not finish within {self.timeout:g} s "
                "(EDGEHARVEST_REQUEST_TIMEOUT_SECONDS)",
            )
        finally:
            self._deadlines.pop(task, None)
            self._timed_out.discard(task)

    async def _watch(self) -> None:
        """Cancel requests past their deadline; runs while any request is waiting.

        One watchdog instead of a timer per request: `asyncio.timeout` costs about 5 us a
        request, a quarter of this layer's budget; the price is a resolution of a tenth of the
        timeout (at most half a second)."""
        loop = asyncio.get_running_loop()
        while self._deadlines:
            await asyncio.sleep(self._resolution)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    del self._deadlines[task]
                    self._timed_out.add(task)
                    task.cancel()
