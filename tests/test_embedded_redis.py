"""The embedded Redis: persisted under its data directory, shared by every local process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from service.embedded_redis import PIDFILE_NAME, EmbeddedRedis
from service.redis_connection import create_redis
from tests.support import REPO_ROOT


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "var"
    yield path
    # Whatever a failed test left running dies with it.
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((path / PIDFILE_NAME).read_text()), signal.SIGKILL)


def answers(url: str) -> bool:
    client = create_redis(url, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def connected_clients(url: str) -> int:
    client = create_redis(url)
    try:
        return len(client.client_list(_type="normal"))
    finally:
        client.close()


def test_data_persists_across_restarts(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    assert url == f"unix://{data_dir.resolve()}/redis.sock"
    assert server.started_here
    client = create_redis(url)
    client.xadd("edgeharvest:{digits}:1:events", {"id": "e1"})
    client.set("edgeharvest:{digits}:note", "kept")
    client.close()
    server.stop()
    assert not answers(url)

    again = EmbeddedRedis(data_dir)
    assert again.start() == url
    client = create_redis(url)
    entries = client.xrange("edgeharvest:{digits}:1:events") or []
    assert [fields for _, fields in entries] == [{b"id": b"e1"}]
    assert client.get("edgeharvest:{digits}:note") == b"kept"
    client.close()
    again.stop()
    assert (data_dir / "appendonly.aof").exists()


def test_second_instance_reuses_the_running_server(data_dir: Path) -> None:
    first, second = EmbeddedRedis(data_dir), EmbeddedRedis(data_dir)
    url = first.start()
    assert second.start() == url
    assert first.started_here and not second.started_here
    client = create_redis(url)
    client.set("shared", "yes")
    client.close()

    second.stop()  # not its server: it stays up
    assert answers(url)
    first.stop()
    assert not answers(url)


def test_a_separate_process_shares_the_server(data_dir: Path) -> None:
    owner = EmbeddedRedis(data_dir)
    url = owner.start()
    client = create_redis(url)
    client.set("from", "owner")
    client.close()
    worker = (
        "import sys; from pathlib import Path; "
        "from service.embedded_redis import EmbeddedRedis; "
        "from service.redis_connection import create_redis; "
        "e = EmbeddedRedis(Path(sys.argv[1])); url = e.start(); "
        "print(e.started_here, create_redis(url).get('from').decode()); e.stop()"
    )
    result = subprocess.run(
        [sys.executable, "-c", worker, str(data_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["False", "owner"]
    assert answers(url)
    owner.stop()


def test_concurrent_starts_launch_one_server(data_dir: Path) -> None:
    servers = [EmbeddedRedis(data_dir) for _ in range(4)]
    urls: list[str] = []
    threads = [threading.Thread(target=lambda s=s: urls.append(s.start())) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(urls)) == 1 and len(urls) == 4
    assert sum(s.started_here for s in servers) == 1
    for server in servers:
        server.stop()
    assert not answers(urls[0])


def test_owner_leaves_the_server_up_while_others_are_connected(data_dir: Path) -> None:
    owner = EmbeddedRedis(data_dir)
    url = owner.start()
    worker = create_redis(url)
    worker.ping()
    owner.stop()
    assert answers(url)

    worker.close()
    wait_until(lambda: connected_clients(url) == 1)  # only the one counting
    owner.stop()
    assert not answers(url)


def test_too_long_data_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too deep for a unix socket path"):
        EmbeddedRedis(tmp_path / ("d" * 120)).start()


def test_restarts_after_a_crash_with_acknowledged_writes(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    client = create_redis(url)
    client.set("before-crash", "1")
    client.close()
    os.kill(int((data_dir / PIDFILE_NAME).read_text()), signal.SIGKILL)
    wait_until(lambda: not answers(url))
    server.stop()  # only reaps the dead process

    # The socket file and pidfile are left behind; neither may stop a new server starting.
    again = EmbeddedRedis(data_dir)
    assert again.start() == url and again.started_here
    client = create_redis(url)
    # Redis writes the append-only file before it replies, so a process crash loses nothing
    # it acknowledged.
    assert client.get("before-crash") == b"1"
    client.close()
    again.stop()


def test_pidfile_naming_another_process_does_not_block_start(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (data_dir / PIDFILE_NAME).write_text(f"{unrelated.pid}\n")
        server = EmbeddedRedis(data_dir, start_timeout=20)
        url = server.start()
        assert server.started_here and answers(url)
        server.stop()
    finally:
        unrelated.kill()
        unrelated.wait()
