"""The secrets ``pflea up`` generates on first start and keeps in its data folder.

Everything secret lives under ``<PFLEA_DATA_DIR>/secrets`` (0700, files 0600, created that way,
never widened): one password per Postgres role (``postgres.json``) and a libpq password file
(``pgpass``) so that ``psql`` and the CLI's readers log in without a password on the command
line or in the terminal. Delete a role's entry and restart to rotate it.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.bootstrap import ROLES
from shared.private_files import new_password, write_private


def secrets_folder(data_dir: Path) -> Path:
    return Path(data_dir) / "secrets"


def database_passwords(data_dir: Path) -> dict[str, str]:
    """A distinct password per role of shared.bootstrap.ROLES, made the first time."""
    path = secrets_folder(data_dir) / "postgres.json"
    try:
        stored: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    passwords = {role: stored.get(role) or new_password() for role in ROLES}
    if passwords != stored:
        write_private(path, json.dumps(passwords, indent=2))
    return passwords


def write_pgpass(data_dir: Path, entries: list[tuple[str, int, str, str, str]]) -> Path:
    """A libpq password file (``PGPASSFILE``) of (host, port, database, role, password)."""
    path = secrets_folder(data_dir) / "pgpass"

    def field(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace(":", "\\:")

    write_private(path, "".join(":".join(map(field, entry)) + "\n" for entry in entries))
    return path


def web_operator_token(data_dir: Path) -> Path:
    """The explorer's operator token (``secrets/web-operator-token``), made the first time;
    returns where it is, to print the path and never the token."""
    path = secrets_folder(data_dir) / "web-operator-token"
    if not path.exists() or not path.read_text().strip():
        write_private(path, new_password() + "\n")
    return path
