"""Configuration from environment variables only; a bad value names its variable."""

from __future__ import annotations

import math
import os
import re
import types
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import msgspec

from shared.money import MoneyError, parse_amount

CASINO_FEED = "casino"  # the name of the feed at PURPLEFLEA_API_URL (shared.envelope too)

# What an agent id may be: it is a NATS subject token (pflea.cmd.<agent>.<Command>) and a stream id.
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_AGENT_ID = AGENT_ID_PATTERN


DEFAULT_DATA_DIR = Path(".pflea")
_UNIONS = (Union, types.UnionType)


class SettingsError(ValueError):
    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable


class AgentCredential(msgspec.Struct, frozen=True):
    agent_id: str
    api_key: str

    def __repr__(self) -> str:  # API keys never reach a log line.
        return f"AgentCredential(agent_id={self.agent_id!r}, api_key='***')"


class Feed(msgspec.Struct, frozen=True):
    """One Purple Flea transaction feed: its name (part of every transaction's identity) and
    base URL (``GET <url>/transactions``)."""

    name: str
    url: str


# PFLEA_TX's default size bound. nats-server reserves a stream's max_bytes on its disk when the
# stream is created, so this stays modest; the ingester just waits when it is reached.
TX_MAX_BYTES_DEFAULT = 1024**3

DEFAULT_CASINO_URL = "https://casino.purpleflea.com/api"
DEFAULT_FAUCET_URL = "https://faucet.purpleflea.com/api"
FEED_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


MAX_PARTITIONS = 64  # PFLEA_WRITER_PARTITIONS; shared/locks.py gives each one its own lock id


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every knob of every service; field ``x`` is read from the variable in ``ENV_NAMES``."""

    database_url: str = ""
    nats_url: str = ""
    purpleflea_api_url: str = DEFAULT_CASINO_URL
    purpleflea_faucet_url: str = DEFAULT_FAUCET_URL
    purpleflea_feeds: tuple[Feed, ...] = ()
    purpleflea_agents: tuple[AgentCredential, ...] = ()
    data_dir: Path = DEFAULT_DATA_DIR
    namespace: str = "pflea"
    allow_default_passwords: bool = False
    duplicate_window_s: float = 120.0
    # Copies of each stream (and its consumers) a JetStream cluster keeps: 3 in a 3-node cluster.
    stream_replicas: int = 1
    # Size limits of the two streams (-1: none). A full PFLEA_TX refuses publishes (the ingester
    # waits); a full PFLEA_EVENTS drops its oldest (projectors catch up from Postgres).
    tx_max_msgs: int = -1
    tx_max_bytes: int = TX_MAX_BYTES_DEFAULT
    events_max_msgs: int = -1
    events_max_bytes: int = -1
    writer_batch_size: int = 1000  # transactions per Postgres transaction
    writer_pull_batch: int | None = None  # see messages_per_writer_pull()
    writer_max_deliver: int = 10
    writer_parts: tuple[str, ...] = ("append", "commands")
    # Partitions of PFLEA_TX, each with one appending writer: set on the stream by `pflea
    # migrate` / `pflea up`; writers follow what the stream says (README "Partitioned writers").
    writer_partitions: int = 1
    ack_wait_s: float = 30.0
    projector_batch_size: int = 1000
    ingest_concurrency: int = 48
    ingest_page_limit: int = 500
    ingest_poll_interval_s: float = 1.0
    ingest_idle_poll_max_s: float = 5.0
    ingest_timeout_s: float = 10.0
    ingest_max_page_bytes: int = 16 * 1024 * 1024
    # Recently published ids the ingester keeps to skip repeated pages, over all agents and
    # feeds (each keeps at most a page of them); see services/ingester/recent.py.
    ingest_recent_ids: int = 20_000
    # Agents hash to this many slots, which ingester replicas lease (shared/membership.py);
    # the same on every replica. The lease TTL is the bucket's max_age (`pflea migrate` sets it).
    ingest_slots: int = 64
    ingest_lease_ttl_s: float = 6.0
    relay_poll_s: float = 1.0
    snapshot_every: int = 100
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"  # compose: 0.0.0.0, inside its network, for Prometheus
    embedded_pg_port: int = 15432
    embedded_nats_port: int = 14222
    log_level: str = "INFO"
    agents_from_simulator: bool = False
    command_concurrency: int = 64
    command_timeout_s: float = 10.0
    # The writer answers only commands nats-server stamped as sent by the subject's agent
    # (header Nats-Request-Info); off only for a NATS server without accounts (the tests').
    command_auth: bool = True
    faucet_amount: str = "10.00"
    # Local faucet claims (no Purple Flea API answers them) an agent may make per window.
    faucet_claims: int = 1
    faucet_window_s: float = 86400.0
    # The web explorer (services/web): where it listens, and the operator's login token (it also
    # keys the session cookies; the service refuses to start without one).
    web_host: str = "127.0.0.1"
    web_port: int = 18080
    web_operator_token: str = ""

    def feeds(self) -> tuple[Feed, ...]:
        """The feeds to poll: PURPLEFLEA_FEEDS, else the casino's at PURPLEFLEA_API_URL."""
        return self.purpleflea_feeds or (Feed(CASINO_FEED, self.purpleflea_api_url.rstrip("/")),)

    def messages_per_writer_pull(self) -> int:
        """PFLEA_TX messages the writer asks for per pull request: PFLEA_WRITER_PULL_BATCH,
        else PFLEA_WRITER_BATCH_SIZE (one number for both, as before the two were told apart)."""
        return self.writer_pull_batch or self.writer_batch_size


ENV_NAMES: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "nats_url": "NATS_URL",
    "purpleflea_api_url": "PURPLEFLEA_API_URL",
    "purpleflea_faucet_url": "PURPLEFLEA_FAUCET_URL",
    "purpleflea_feeds": "PURPLEFLEA_FEEDS",
    "purpleflea_agents": "PURPLEFLEA_AGENTS",
    "data_dir": "PFLEA_DATA_DIR",
    "namespace": "PFLEA_NAMESPACE",
    "allow_default_passwords": "PFLEA_ALLOW_DEFAULT_PASSWORDS",
    "duplicate_window_s": "PFLEA_DUPLICATE_WINDOW_S",
    "stream_replicas": "PFLEA_STREAM_REPLICAS",
    "tx_max_msgs": "PFLEA_TX_MAX_MSGS",
    "tx_max_bytes": "PFLEA_TX_MAX_BYTES",
    "events_max_msgs": "PFLEA_EVENTS_MAX_MSGS",
    "events_max_bytes": "PFLEA_EVENTS_MAX_BYTES",
    "writer_batch_size": "PFLEA_WRITER_BATCH_SIZE",
    "writer_pull_batch": "PFLEA_WRITER_PULL_BATCH",
    "writer_max_deliver": "PFLEA_WRITER_MAX_DELIVER",
    "writer_parts": "PFLEA_WRITER_PARTS",
    "writer_partitions": "PFLEA_WRITER_PARTITIONS",
    "ack_wait_s": "PFLEA_ACK_WAIT_S",
    "projector_batch_size": "PFLEA_PROJECTOR_BATCH_SIZE",
    "ingest_concurrency": "PFLEA_INGEST_CONCURRENCY",
    "ingest_page_limit": "PFLEA_INGEST_PAGE_LIMIT",
    "ingest_poll_interval_s": "PFLEA_INGEST_POLL_INTERVAL_S",
    "ingest_idle_poll_max_s": "PFLEA_INGEST_IDLE_POLL_MAX_S",
    "ingest_timeout_s": "PFLEA_INGEST_TIMEOUT_S",
    "ingest_max_page_bytes": "PFLEA_INGEST_MAX_PAGE_BYTES",
    "ingest_recent_ids": "PFLEA_INGEST_RECENT_IDS",
    "ingest_slots": "PFLEA_INGEST_SLOTS",
    "ingest_lease_ttl_s": "PFLEA_INGEST_LEASE_TTL_S",
    "relay_poll_s": "PFLEA_RELAY_POLL_S",
    "snapshot_every": "PFLEA_SNAPSHOT_EVERY",
    "metrics_port": "PFLEA_METRICS_PORT",
    "metrics_host": "PFLEA_METRICS_HOST",
    "embedded_pg_port": "PFLEA_EMBEDDED_PG_PORT",
    "embedded_nats_port": "PFLEA_EMBEDDED_NATS_PORT",
    "log_level": "PFLEA_LOG_LEVEL",
    "agents_from_simulator": "PFLEA_AGENTS_FROM_SIMULATOR",
    "command_concurrency": "PFLEA_COMMAND_CONCURRENCY",
    "command_timeout_s": "PFLEA_COMMAND_TIMEOUT_S",
    "command_auth": "PFLEA_COMMAND_AUTH",
    "faucet_amount": "PFLEA_FAUCET_AMOUNT",
    "faucet_claims": "PFLEA_FAUCET_CLAIMS",
    "faucet_window_s": "PFLEA_FAUCET_WINDOW_S",
    "web_host": "PFLEA_WEB_HOST",
    "web_port": "PFLEA_WEB_PORT",
    "web_operator_token": "PFLEA_WEB_OPERATOR_TOKEN",
}

_POSITIVE = {
    "duplicate_window_s",
    "writer_batch_size",
    "writer_pull_batch",
    "writer_max_deliver",
    "writer_partitions",
    "ack_wait_s",
    "projector_batch_size",
    "ingest_concurrency",
    "ingest_page_limit",
    "ingest_timeout_s",
    "ingest_max_page_bytes",
    "ingest_recent_ids",
    "ingest_slots",
    "ingest_lease_ttl_s",
    "snapshot_every",
    "command_concurrency",
    "command_timeout_s",
    "faucet_claims",
    "faucet_window_s",
}

# Stream limits: a positive number, or -1 for none (nats-server's own convention).
_LIMITS = ("tx_max_msgs", "tx_max_bytes", "events_max_msgs", "events_max_bytes")


def parse_agents(text: str) -> tuple[AgentCredential, ...]:
    """Parse ``agent_id:api_key,agent_id:api_key``."""
    agents = []
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        agent_id, sep, api_key = item.partition(":")
        if not sep or not api_key:
            raise SettingsError("PURPLEFLEA_AGENTS", f"entry for {agent_id!r} is not agent_id:api_key")
        if not _AGENT_ID.fullmatch(agent_id):
            raise SettingsError(
                "PURPLEFLEA_AGENTS", f"agent id {agent_id!r} must match [A-Za-z0-9_-]{{1,64}}"
            )
        if agent_id in seen:
            raise SettingsError("PURPLEFLEA_AGENTS", f"agent id {agent_id!r} is listed twice")
        seen.add(agent_id)
        agents.append(AgentCredential(agent_id, api_key))
    return tuple(agents)


def parse_feeds(text: str) -> tuple[Feed, ...]:
    """Parse ``name=url,name=url`` (as ``casino=https://casino.purpleflea.com/api``)."""
    feeds: list[Feed] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, url = item.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not url.startswith(("http://", "https://")):
            raise SettingsError("PURPLEFLEA_FEEDS", f"entry {item!r} is not name=http(s)://url")
        if not FEED_NAME_PATTERN.fullmatch(name):
            raise SettingsError("PURPLEFLEA_FEEDS", f"feed name {name!r} must match [a-z][a-z0-9_]{{0,31}}")
        if any(f.name == name for f in feeds):
            raise SettingsError("PURPLEFLEA_FEEDS", f"feed {name!r} is listed twice")
        feeds.append(Feed(name, url.rstrip("/")))
    return tuple(feeds)


# "relay" and "snapshots" moved to `python -m services.relay`; accepted (with a warning) for one release.
WRITER_PARTS = ("append", "commands", "relay", "snapshots")


def parse_writer_parts(text: str) -> tuple[str, ...]:
    """``append,commands``: which of the writer's parts this process runs (at least one)."""
    parts = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in parts if p not in WRITER_PARTS]
    if unknown or not parts:
        raise SettingsError(
            "PFLEA_WRITER_PARTS", f"expected a comma list of {', '.join(WRITER_PARTS)}, got {text!r}"
        )
    return parts


# JetStream keeps at most 5 copies of a stream (one per server, in a cluster of 5 or more).
MAX_STREAM_REPLICAS = 5


def parse_stream_replicas(text: str) -> int:
    replicas = convert("PFLEA_STREAM_REPLICAS", text, int)
    if not 1 <= replicas <= MAX_STREAM_REPLICAS:
        raise SettingsError("PFLEA_STREAM_REPLICAS", f"must be 1 to {MAX_STREAM_REPLICAS}, got {text!r}")
    return int(replicas)


def parse_nats_url(text: str) -> str:
    """NATS_URL as given, once it reads as one server or a comma list (shared/nats_url.py)."""
    from shared.nats_url import parse_nats_url as servers  # it reports through SettingsError

    servers(text)
    return text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "nats_url": parse_nats_url,
    "stream_replicas": parse_stream_replicas,
    "purpleflea_agents": parse_agents,
    "purpleflea_feeds": parse_feeds,
    "writer_parts": parse_writer_parts,
}


def convert(variable: str, raw: str, target: Any) -> Any:
    """``raw``, the value of ``variable``, as a ``target``: str (verbatim), Path, bool, int or a
    finite float, or one of those ``| None``. Raises :class:`SettingsError` naming ``variable``."""
    options = [t for t in get_args(target) if t is not type(None)] if get_origin(target) in _UNIONS else []
    if len(options) == 1:
        target = options[0]
    if target is str:
        return raw
    if target is Path:
        return Path(raw).expanduser()
    if target is bool:
        flag = raw.strip().lower()
        if flag not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise SettingsError(variable, f"expected 1/0/true/false/on/off, got {raw!r}")
        return flag in ("1", "true", "yes", "on")
    if target not in (int, float):
        raise TypeError(f"{variable}: no conversion to {target!r}; give the field a parser")
    try:
        value: int | float = msgspec.convert(raw.strip(), target, strict=False)
    except msgspec.ValidationError:
        raise SettingsError(variable, f"expected {target.__name__}, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(variable, f"expected a finite number, got {raw!r}")
    return value


def read_environ(
    environ: Mapping[str, str],
    env_names: Mapping[str, str],
    struct: type[msgspec.Struct],
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    positive: Collection[str] = (),
) -> dict[str, Any]:
    """The fields of ``struct`` whose variable (``env_names``: field -> variable) is set and not
    empty, each converted to its field's type by :func:`convert`, or by ``parsers[field]``.

    Every process reads its configuration through this (services, the CLI, the simulator), so a
    bad value is reported the same way everywhere: a :class:`SettingsError` naming the variable.
    """
    field_types = {f.name: f.type for f in msgspec.structs.fields(struct)}
    parsers = parsers or {}
    values: dict[str, Any] = {}
    for field, variable in env_names.items():
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        parse = parsers.get(field)
        value = parse(raw) if parse is not None else convert(variable, raw, field_types[field])
        if field in positive and value <= 0:
            raise SettingsError(variable, f"must be positive, got {raw!r}")
        values[field] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from ``environ`` (default ``os.environ``); ``overrides`` win.

    Only the environment: unset DATABASE_URL / NATS_URL stay empty (a service then refuses to
    start, naming the variable). Finding a running ``pflea up`` through its ``stack.json`` is the
    CLI's convenience (:func:`services.cli.connections.settings`), never a service's.
    """
    env = os.environ if environ is None else environ
    values = read_environ(env, ENV_NAMES, Settings, parsers=_PARSERS, positive=_POSITIVE)
    values.update(overrides)
    settings = Settings(**values)
    try:
        faucet = parse_amount(settings.faucet_amount, "PFLEA_FAUCET_AMOUNT")
    except MoneyError as exc:
        raise SettingsError("PFLEA_FAUCET_AMOUNT", exc.reason) from None
    if faucet <= 0:
        raise SettingsError("PFLEA_FAUCET_AMOUNT", f"must be positive, got {settings.faucet_amount!r}")
    if settings.writer_partitions > MAX_PARTITIONS:
        raise SettingsError(
            "PFLEA_WRITER_PARTITIONS", f"at most {MAX_PARTITIONS}, got {settings.writer_partitions}"
        )
    for field in _LIMITS:
        if (value := getattr(settings, field)) != -1 and value <= 0:
            raise SettingsError(ENV_NAMES[field], f"must be positive, or -1 for no limit, got {value!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", settings.namespace):
        raise SettingsError(
            "PFLEA_NAMESPACE", f"must match [a-z][a-z0-9_]{{0,30}}, got {settings.namespace!r}"
        )
    return settings
