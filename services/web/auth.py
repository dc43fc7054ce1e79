"""Who is looking: the operator (sees every page) or one agent (sees its own pages only).

- The **operator** logs in with ``PFLEA_WEB_OPERATOR_TOKEN`` (``pflea up`` keeps it in
  ``<data>/secrets/web-operator-token``; compose in ``.env``), in the login form or as
  ``Authorization: Bearer <token>`` for scripts.
- An **agent** logs in with its id and the password of its credential file
  (``pflea agents add``), checked against the bcrypt hash in the agents' registry. Removing
  the agent (``pflea agents remove``) ends its sessions at its next request.

A login becomes a session cookie: ``<payload>.<HMAC-SHA256>``, the key derived from the
operator token (rotating the token ends every session), HttpOnly, SameSite=Strict, for
``SESSION_S``. Nothing else is stored on the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import bcrypt
import msgspec

from shared.nats_agents import BCRYPT_ROUNDS, AgentEntry, AgentRegistry, registry_path

COOKIE = "pflea_session"
SESSION_S = 12 * 3600
OPERATOR = "operator"


class Viewer(msgspec.Struct, frozen=True):
    """A logged-in person: ``agent_id`` is None for the operator."""

    agent_id: str | None
    expires: int

    @property
    def is_operator(self) -> bool:
        return self.agent_id is None

    def may_see(self, agent_id: str) -> bool:
        return self.agent_id is None or self.agent_id == agent_id

    @property
    def name(self) -> str:
        return self.agent_id or OPERATOR


_decoder = msgspec.json.Decoder(Viewer)


class Gate:
    """Checks logins and sessions against the operator token and the agents' registry."""

    def __init__(self, operator_token: str, data_dir: Path, namespace: str = "pflea") -> None:
        self._token = operator_token.encode()
        self._key = hmac.new(self._token, b"pflea-web-session", hashlib.sha256).digest()
        self._registry = AgentRegistry(data_dir, namespace)
        self._registry_file = registry_path(data_dir)
        self._agents: dict[str, AgentEntry] = {}
        self._agents_stamp: tuple[int, int] | None = None

    def operator_login(self, token: str) -> Viewer | None:
        if token and hmac.compare_digest(token.encode(), self._token):
            return Viewer(None, int(time.time()) + SESSION_S)
        return None

    def agent_login(self, agent_id: str, password: str) -> Viewer | None:
        entry = self._agent_entries().get(agent_id)
        if entry is None or not password:
            bcrypt.checkpw(b"x", _DUMMY_HASH)  # the same time whether the agent exists or not
            return None
        if not bcrypt.checkpw(password.encode(), entry.password_hash.encode()):
            return None
        return Viewer(agent_id, int(time.time()) + SESSION_S)

    def cookie(self, viewer: Viewer) -> str:
        payload = base64.urlsafe_b64encode(msgspec.json.encode(viewer)).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None) -> Viewer | None:
        """The viewer of a valid, unexpired cookie whose agent still has credentials."""
        if not cookie or "." not in cookie:
            return None
        payload, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            viewer = _decoder.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, msgspec.DecodeError):
            return None
        if viewer.expires < time.time():
            return None
        if viewer.agent_id is not None and viewer.agent_id not in self._agent_entries():
            return None  # revoked since
        return viewer

    def bearer(self, header: str | None) -> Viewer | None:
        scheme, _, token = (header or "").partition(" ")
        return self.operator_login(token.strip()) if scheme.lower() == "bearer" else None

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _agent_entries(self) -> dict[str, AgentEntry]:
        """The registry, read again only when its file changed (every request asks)."""
        try:
            stat = self._registry_file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._agents_stamp:
            self._agents = self._registry.entries() if stamp is not None else {}
            self._agents_stamp = stamp
        return self._agents


_DUMMY_HASH = bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(BCRYPT_ROUNDS))
