"""A real redis-server for tests (Debian's `redis-server`, installed by `make redis`): its own
free loopback port, no persistence, stopped by the test that started it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port, stop_process, wait_until


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None)


def missing() -> str | None:
    return None if redis_binary() else "redis-server not installed: run `make redis` (Debian's redis-server package)"


@dataclass
class RedisServer:
    dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        binary = redis_binary()
        if not binary:
            raise RuntimeError(missing())
        self.port = self.port or free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdout=(self.dir / f"redis-{self.port}.log").open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(self.ping, timeout, "redis-server answering PING", self.proc)
        except TimeoutError:
            self.stop()
            raise
        self.starts.append(time.monotonic())
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):
        """A plain redis client (the same library the gateway uses) for what tests check."""
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
