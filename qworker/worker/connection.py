"""Redis connection settings (from a URL) and the backoff used to reconnect."""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlparse

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from qworker.logs import redact_url

SCHEMES = ("redis", "rediss", "unix")


@dataclass(slots=True)
class RedisSettings:
    """Where Redis is and how long to wait for it.

    ``socket_timeout`` must exceed the longest blocking read (the worker blocks at most a
    second). Connections do not retry by themselves: the caller's loop owns the backoff,
    so a lost Redis never freezes a thread for longer than one timeout.
    """

    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0

    @classmethod
    def from_url(cls, url: str, **kw: float) -> RedisSettings:
        """Validate a ``redis://``, ``rediss://`` or ``unix://`` URL."""
        scheme = urlparse(url).scheme
        if scheme not in SCHEMES:
            raise ValueError("Redis URL must start with redis://, rediss:// or unix://, got "
                             f"{redact_url(url)!r}")
        return cls(url=url, **kw)

    def _kwargs(self) -> dict:
        return dict(socket_timeout=self.socket_timeout,
                    socket_connect_timeout=self.connect_timeout,
                    retry=Retry(NoBackoff(), 0), health_check_interval=15)

    def connect(self) -> redis.Redis:
        """A synchronous client (bytes replies)."""
        return redis.Redis.from_url(self.url, **self._kwargs())

    def connect_async(self) -> redis.asyncio.Redis:
        """An asyncio client (bytes replies)."""
        return redis.asyncio.Redis.from_url(self.url, **self._kwargs())


class Backoff:
    """Exponential backoff with full jitter: 50 ms doubling up to ``cap`` seconds."""

    def __init__(self, base: float = 0.05, cap: float = 2.0):
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        """Seconds to sleep after one more failure."""
        self.failures += 1
        return random.uniform(0.5, 1.0) * min(self.cap, self.base * 2 ** min(self.failures, 16))

    def reset(self) -> None:
        self.failures = 0


REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError)
"""Errors that mean "Redis is unreachable right now": retry with backoff. (A refused
password is a ``redis.ConnectionError`` too: test ``access_error`` first.)"""


class RedisAccessError(RuntimeError):
    """Redis refused the credentials or a command (ACL): retrying cannot help."""


_DENIED = ("NOPERM", "no permissions", "can't run this command")


def access_error(e: BaseException, url: str | None = None) -> RedisAccessError | None:
    """A ``RedisAccessError`` with a clear message when ``e`` means a wrong user or password
    (``AuthenticationError``: WRONGPASS, NOAUTH) or a missing ACL permission (``NOPERM``,
    also from inside a script); None for anything else (transient errors are retried)."""
    where = f" at {redact_url(url)}" if url else ""
    if isinstance(e, redis.AuthenticationError) or (
            isinstance(e, redis.ResponseError) and str(e).startswith(("WRONGPASS", "NOAUTH"))):
        return RedisAccessError(
            f"Redis{where} refused the credentials ({e}): check the user and password in "
            "--redis-url / QWORKER_REDIS_URL; see docs/security.md")
    if isinstance(e, redis.exceptions.NoPermissionError) or (
            isinstance(e, redis.ResponseError) and any(d in str(e) for d in _DENIED)):
        return RedisAccessError(
            f"the Redis user{where} lacks a permission the worker needs ({e}): give it the "
            "worker role's rules (python -m qworker.acl --role worker); see docs/security.md")
    return None
