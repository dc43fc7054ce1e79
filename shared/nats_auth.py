"""Per-service NATS users: the same least-privilege permissions for compose and ``pflea up``.

``nats_accounts.conf`` is the one definition, written for the default namespace ``pflea`` with
passwords as NATS variables (``$INGESTER_NATS_PASSWORD``). ``deploy/nats/nats.conf`` carries
it verbatim (a test checks that); ``render_accounts`` adapts it to another namespace and to
literal passwords for the embedded server.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from importlib import resources
from pathlib import Path

USERS = ("ingester", "writer", "projector", "cli")


def accounts_template() -> str:
    return resources.files("shared").joinpath("nats_accounts.conf").read_text()


def password_variable(user: str) -> str:
    return f"{user.upper()}_NATS_PASSWORD"


def render_accounts(namespace: str, passwords: dict[str, str]) -> str:
    """The accounts block for ``namespace`` with the given literal passwords."""
    text = accounts_template()
    if namespace != "pflea":
        text = re.sub(r"\bpflea\.", f"{namespace}.", text)
        text = text.replace("PFLEA_TX", f"{namespace.upper()}_TX")
        text = text.replace("PFLEA_EVENTS", f"{namespace.upper()}_EVENTS")
    for user in USERS:
        # Quoted, so that NATS reads a literal and not a variable or a number.
        text = text.replace(f"${password_variable(user)}", json.dumps(passwords[user]))
    return text


def load_or_create_passwords(path: Path) -> dict[str, str]:
    """Random passwords kept with the embedded server's data (readable by the owner only)."""
    try:
        stored: dict[str, str] = json.loads(path.read_text())
        if set(USERS) <= set(stored):
            return stored
    except (OSError, ValueError):
        pass
    # URL-safe and starting with a letter: they travel inside NATS_URL.
    passwords = {user: "p" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y") for user in USERS}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(passwords))
    os.chmod(path, 0o600)
    return passwords


def user_url(url: str, user: str, password: str) -> str:
    """``nats://host:port`` with a user's credentials."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.rpartition('@')[2]}"
