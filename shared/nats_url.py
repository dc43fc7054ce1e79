"""NATS_URL: one server or several, comma-separated as the ``nats`` CLI takes them.

``nats://writer:pw@a:4222,nats://b:4222,nats://c:4222`` names three servers of one cluster; the
client connects to any and fails over to the others. The credentials may be written on every
server or on some only: they are one login, given to the client apart from the addresses, so
that servers the cluster announces later (which come without credentials) are logged in to the
same way. Servers with different credentials are refused: nothing could tell which is meant.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

import msgspec

from shared.settings import SettingsError

SCHEMES = ("nats", "tls", "ws", "wss")
DEFAULT_PORT = 4222


class NatsServers(msgspec.Struct, frozen=True):
    """The servers of a NATS_URL without credentials, and the one login for all of them."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # a password never reaches a log line
        secret = "" if self.password is None else ", password='***'"
        return f"NatsServers({list(self.servers)!r}, user={'***' if self.token else self.user!r}{secret})"

    @property
    def token(self) -> str | None:
        """``nats://<token>@host``: a user without a password is a token."""
        return self.user if self.password is None else None

    def connect_options(self) -> dict[str, Any]:
        """nats-py ``connect`` keywords: ``servers`` and the login."""
        options: dict[str, Any] = {"servers": list(self.servers)}
        if self.token is not None:
            options["token"] = self.token
        elif self.user is not None:
            options.update(user=self.user, password=self.password)
        return options

    def url(self) -> str:
        """As a NATS_URL again: the login on every server."""
        return ",".join(_with_login(server, self.user, self.password) for server in self.servers)


def parse_nats_url(url: str, variable: str = "NATS_URL") -> NatsServers:
    """The servers and login of ``url``; a :class:`SettingsError` naming ``variable`` if it is
    no list of ``[scheme://][user[:password]@]host[:port]``."""
    servers: list[str] = []
    logins: set[tuple[str, str | None]] = set()
    for part in (p.strip() for p in url.split(",")):
        if not part:
            continue
        text = part if "://" in part else f"nats://{part}"
        try:
            parts = urlsplit(text)
            port = parts.port or (None if parts.scheme in ("ws", "wss") else DEFAULT_PORT)
        except ValueError:
            raise SettingsError(variable, f"{_hidden(part)} is not a server address") from None
        if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/"):
            raise SettingsError(
                variable, f"{_hidden(part)} is not [nats|tls|ws|wss://][user:password@]host[:port]"
            )
        if parts.username is not None:
            password = None if parts.password is None else unquote(parts.password)
            logins.add((unquote(parts.username), password))
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        address = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
        if address not in servers:
            servers.append(address)
    if not servers:
        raise SettingsError(variable, "names no server")
    if len({scheme in ("ws", "wss") for scheme in (s.partition(":")[0] for s in servers)}) > 1:
        raise SettingsError(variable, "mixes websocket and plain servers")
    if len(logins) > 1:
        raise SettingsError(variable, "its servers carry different users or passwords; give one login")
    user, password = logins.pop() if logins else (None, None)
    return NatsServers(tuple(servers), user, password)


def with_login(url: str, user: str, password: str) -> str:
    """``url`` (one server or several) logging in as ``user`` on each."""
    return NatsServers(parse_nats_url(url).servers, user, password).url()


def without_login(url: str) -> str:
    """``url`` (one server or several) with no user or password in it."""
    return NatsServers(parse_nats_url(url).servers).url()


def _with_login(server: str, user: str | None, password: str | None) -> str:
    if user is None:
        return server
    scheme, _, host = server.partition("://")
    login = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
    return f"{scheme}://{login}@{host}"


def _hidden(part: str) -> str:
    """A server of NATS_URL as an error may show it: nothing before an ``@``."""
    scheme, sep, rest = part.rpartition("://")
    return f"{scheme}{sep}…@{rest.rpartition('@')[2]}" if "@" in rest else part
