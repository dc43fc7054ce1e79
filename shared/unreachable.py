"""How services say a server is unreachable: one short line naming it (never its password) and
when they try again, repeated at most every 30 s with a count, never a traceback per attempt."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import Counter

CONNECT_FAILURES = Counter("pflea_connect_failures_total", "Failed attempts to reach a server", ["server"])


def redacted_url(url: str) -> str:
    """``url`` (or a comma list of them) without secrets: a password, or a NATS token alone."""
    return ",".join(_redacted(part.strip()) for part in url.split(","))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    # nats://token@host carries a secret where the user name goes.
    netloc = f"{user}:***@{host}" if has_password else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and message, no traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ServerUnreachable(ConnectionError):
    """A server a service needs did not answer; says which, where, and why, in one line."""

    def __init__(self, server: str, url: str, cause: BaseException) -> None:
        super().__init__(f"{server} at {redacted_url(url)} is unreachable ({describe(cause)})")
        self.server = server


class RepeatedWarnings:
    """Log a warning at once, the same one again at most every ``every_s`` with how often it
    came meanwhile: a server down for an hour costs a hundred short lines, not thousands."""

    def __init__(self, logger: logging.Logger, every_s: float = 30.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (last logged, held back since)

    def warning(self, message: str) -> None:
        now = time.monotonic()
        seen = self._seen.get(message)
        if seen is None:
            if len(self._seen) > 100:  # messages that vary without end must not grow this for ever
                self._seen.clear()
            self._seen[message] = (now, 0)
            self.logger.warning("%s", message)
            return
        logged_at, held = seen
        if now - logged_at < self.every_s:
            self._seen[message] = (logged_at, held + 1)
            return
        self._seen[message] = (now, 0)
        self.logger.warning("%s (repeated %d times in the last %.0fs)", message, held + 1, now - logged_at)

    def clear(self) -> bool:
        """Forget what was logged (the trouble is over); True if anything was."""
        had = bool(self._seen)
        self._seen.clear()
        return had
