"""tapflow settings: Tap's ``TAP_*`` environment (and a ``.env`` file), plus tapflow's own.

Every variable of Tap's ``tap run`` is accepted with Tap's default and Go's parsing rules
(bools ``true/false/1/0/t/f``, durations ``60s``/``1m``/``1h30m``, comma lists), so an
existing Tap deployment's environment works unchanged. Values are checked at start and
every bad one is reported at once with a clear message (``ConfigError``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

VERSION = "0.1.0"
USER_AGENT = f"tapflow/{VERSION} (tap-compatible)"


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go ``time.ParseDuration`` (seconds as float): ``90s``, ``1m30s``, ``-5s``, ``0``."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    pos, total = 0, 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r} (use Go syntax like 60s, 1m, 1h30m)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_bool(text: str) -> bool:
    """Go ``strconv.ParseBool``."""
    t = text.strip()
    if t in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if t in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"invalid boolean {text!r} (use true/false/1/0/t/f)")


def parse_list(text: str) -> list[str]:
    """Comma-separated list, items trimmed, empty items dropped."""
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_bind(text: str) -> tuple[str, int]:
    """Go listen address ``host:port`` or ``:port`` to (host, port); empty host = all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"invalid listen address {text!r} (use host:port or :port)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(frozen=True)
class Setting:
    """One environment setting: its names (first wins), default text, parser and help."""

    attr: str
    env: tuple[str, ...]
    default: str
    kind: str  # str | int | bool | duration | list | url | bind
    help: str


SETTINGS: tuple[Setting, ...] = (
    # --- Tap's own (spec/tap-behavior.md §2), same names and defaults ---
    Setting("database_url", ("TAP_DATABASE_URL",), "sqlite://./tap.db", "str",
            "Tap's SQL database URL; accepted for compatibility, unused (tapflow keeps state in RocksDB under TAP_DATA_DIR)"),
    Setting("max_db_conns", ("TAP_MAX_DB_CONNS",), "32", "int", "accepted for compatibility, unused"),
    Setting("bind", ("TAP_BIND",), ":2480", "bind", "HTTP API and /channel listen address"),
    Setting("plc_url", ("TAP_PLC_URL", "ATP_PLC_HOST"), "https://plc.directory", "url", "PLC directory URL"),
    Setting("relay_url", ("TAP_RELAY_URL",), "https://relay1.us-east.bsky.network", "url",
            "relay for the firehose and listRepos/listReposByCollection"),
    Setting("firehose_parallelism", ("TAP_FIREHOSE_PARALLELISM",), "10", "int",
            "accepted for compatibility; verification parallelism is TAP_VERIFY_WORKERS"),
    Setting("resync_parallelism", ("TAP_RESYNC_PARALLELISM",), "5", "int", "repo fetches (getRepo) in flight at once"),
    Setting("outbox_parallelism", ("TAP_OUTBOX_PARALLELISM",), "1", "int", "accepted for compatibility; ordering never breaks in tapflow"),
    Setting("cursor_save_interval", ("TAP_CURSOR_SAVE_INTERVAL",), "1s", "duration", "firehose cursor persistence period"),
    Setting("no_replay", ("TAP_NO_REPLAY",), "false", "bool", "ignore the saved cursor; always start at the live head"),
    Setting("repo_fetch_timeout", ("TAP_REPO_FETCH_TIMEOUT",), "300s", "duration", "getRepo timeout (<=0 means 30s)"),
    Setting("ident_cache_size", ("TAP_IDENT_CACHE_SIZE", "RELAY_IDENT_CACHE_SIZE"), "2000000", "int", "identity cache capacity"),
    Setting("outbox_capacity", ("TAP_OUTBOX_CAPACITY",), "100000", "int",
            "undelivered events at which firehose and backfill are held back"),
    Setting("full_network", ("TAP_FULL_NETWORK",), "false", "bool", "track every repo on the relay"),
    Setting("signal_collection", ("TAP_SIGNAL_COLLECTION",), "", "str", "track repos that have records in this NSID"),
    Setting("disable_acks", ("TAP_DISABLE_ACKS",), "false", "bool", "fire-and-forget /channel"),
    Setting("webhook_url", ("TAP_WEBHOOK_URL",), "", "str", "deliver events as POSTs to this URL (disables /channel)"),
    Setting("collection_filters", ("TAP_COLLECTION_FILTERS",), "", "list", "comma list of NSIDs; a trailing * matches a prefix"),
    Setting("outbox_only", ("TAP_OUTBOX_ONLY",), "false", "bool", "no firehose, crawler or resync: deliver what is stored"),
    Setting("admin_password", ("TAP_ADMIN_PASSWORD",), "", "str", "HTTP Basic auth (user admin) on every route and the webhook"),
    Setting("retry_timeout", ("TAP_RETRY_TIMEOUT",), "60s", "duration", "ack mode: resend an unacked event after this"),
    Setting("log_level", ("TAP_LOG_LEVEL", "LOG_LEVEL"), "info", "str", "debug, info, warn or error"),
    Setting("metrics_listen", ("TAP_METRICS_LISTEN",), "", "str", "Prometheus /metrics listen address (empty = off)"),
    Setting("env", ("TAP_ENV",), "dev", "str", "accepted for compatibility, unused"),
    # --- tapflow's own ---
    Setting("data_dir", ("TAP_DATA_DIR",), "./tap-data", "str", "RocksDB state, outbox and delivery state"),
    Setting("shards", ("TAP_SHARDS",), "64", "int", "repo shards (crc32(DID) % N); fixed for the life of a data dir"),
    Setting("resync_deletes", ("TAP_RESYNC_DELETES",), "true", "bool",
            "a resync emits delete events for records that vanished (false = Tap's behaviour)"),
    Setting("max_car_size", ("TAP_MAX_CAR_SIZE",), "1073741824", "int", "largest getRepo CAR accepted, bytes"),
    Setting("backfill_spool_size", ("TAP_BACKFILL_SPOOL_SIZE",), "33554432", "int",
            "getRepo CARs larger than this many bytes go through files under the data dir, not memory"),
    Setting("max_frame_size", ("TAP_MAX_FRAME_SIZE",), "5242880", "int", "largest firehose frame accepted, bytes"),
    Setting("max_body_size", ("TAP_MAX_BODY_SIZE",), "10485760", "int", "largest HTTP API request body, bytes"),
    Setting("handle_resolver", ("TAP_HANDLE_RESOLVER",), "dns,https", "list",
            "handle verification: dns, https, and/or xrpc:<base url> (resolveHandle at that service)"),
    Setting("dns_nameserver", ("TAP_DNS_NAMESERVER",), "", "str", "host:port of the DNS server for _atproto TXT lookups (empty = system)"),
    Setting("public_only", ("TAP_PUBLIC_ONLY",), "false", "bool",
            "refuse outbound requests to private/loopback addresses taken from DID documents"),
    Setting("kafka_bootstrap", ("TAP_KAFKA_BOOTSTRAP",), "", "str", "Kafka bootstrap servers; enables Kafka output"),
    Setting("kafka_topic_prefix", ("TAP_KAFKA_TOPIC_PREFIX",), "tap.", "str", "topic names: <prefix>events, <prefix>records"),
    Setting("kafka_partitions", ("TAP_KAFKA_PARTITIONS",), "8", "int", "partitions of topics created at start"),
    Setting("kafka_replication", ("TAP_KAFKA_REPLICATION",), "1", "int", "replication factor of topics created at start"),
    Setting("kafka_only", ("TAP_KAFKA_ONLY",), "false", "bool", "deliver to Kafka only (no /channel, no webhook)"),
    Setting("kafka_stall_timeout", ("TAP_KAFKA_STALL_TIMEOUT",), "10s", "duration",
            "no Kafka ack this long while events wait and a broker is up: recreate missing topics, restart the producer"),
    Setting("webhook_concurrency", ("TAP_WEBHOOK_CONCURRENCY",), "64", "int", "webhook POSTs in flight at once"),
    Setting("verify_workers", ("TAP_VERIFY_WORKERS",), "2", "int",
            "processes that verify repo CARs (and live commits, see TAP_LIVE_VERIFY) beside the flow (0 = all in the flow process)"),
    Setting("live_verify", ("TAP_LIVE_VERIFY",), "auto", "str",
            "where live #commit frames are verified: pool, inline (in the flow worker), or auto (pool with 2+ CPUs)"),
)

# Settings passed straight to the Kafka client: TAP_KAFKA_SECURITY_PROTOCOL -> security.protocol
_KAFKA_OWN = {"TAP_KAFKA_BOOTSTRAP", "TAP_KAFKA_TOPIC_PREFIX", "TAP_KAFKA_PARTITIONS", "TAP_KAFKA_REPLICATION", "TAP_KAFKA_ONLY",
              "TAP_KAFKA_STALL_TIMEOUT"}


@dataclass(frozen=True)
class Config:
    """Validated settings. Build with ``load_config()``."""

    database_url: str = "sqlite://./tap.db"
    max_db_conns: int = 32
    bind: tuple[str, int] = ("0.0.0.0", 2480)
    plc_url: str = "https://plc.directory"
    relay_url: str = "https://relay1.us-east.bsky.network"
    firehose_parallelism: int = 10
    resync_parallelism: int = 5
    outbox_parallelism: int = 1
    cursor_save_interval: float = 1.0
    no_replay: bool = False
    repo_fetch_timeout: float = 300.0
    ident_cache_size: int = 2_000_000
    outbox_capacity: int = 100_000
    full_network: bool = False
    signal_collection: str = ""
    disable_acks: bool = False
    webhook_url: str = ""
    collection_filters: tuple[str, ...] = ()
    outbox_only: bool = False
    admin_password: str = ""
    retry_timeout: float = 60.0
    log_level: str = "info"
    metrics_listen: str = ""
    env: str = "dev"
    data_dir: str = "./tap-data"
    shards: int = 64
    resync_deletes: bool = True
    max_car_size: int = 1 << 30
    backfill_spool_size: int = 32 << 20
    max_frame_size: int = 5 << 20
    max_body_size: int = 10 << 20
    handle_resolver: tuple[str, ...] = ("dns", "https")
    dns_nameserver: str = ""
    public_only: bool = False
    kafka_bootstrap: str = ""
    kafka_topic_prefix: str = "tap."
    kafka_partitions: int = 8
    kafka_replication: int = 1
    kafka_only: bool = False
    kafka_stall_timeout: float = 10.0
    webhook_concurrency: int = 64
    verify_workers: int = 2
    live_verify: str = "auto"
    kafka_extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def live_verify_in_pool(self) -> bool:
        """Live ``#commit`` verification in the pool's lanes: ``auto`` with 2+ CPUs. On 2 cores
        the flow process is the serial part (live = 1 / its CPU per commit): the lanes take the
        verification off it for about the same CPU in all (measured: docs/performance.md). One
        CPU has nothing to run them beside the flow."""
        if self.verify_workers <= 0 or self.live_verify == "inline":
            return False
        return self.live_verify == "pool" or (os.cpu_count() or 1) >= 2

    @property
    def firehose_url(self) -> str:
        """The relay's subscribeRepos WebSocket URL (http->ws, https->wss, path replaced)."""
        base = self.relay_url.rstrip("/")
        scheme, rest = base.split("://", 1)
        host = rest.split("/", 1)[0]
        ws = "wss" if scheme == "https" else "ws"
        return f"{ws}://{host}/xrpc/com.atproto.sync.subscribeRepos"

    @property
    def delivery_mode(self) -> str:
        """``webhook``, ``fire-and-forget``, ``ack`` or ``kafka-only``: how events leave."""
        if self.kafka_only:
            return "kafka-only"
        if self.webhook_url:
            return "webhook"
        return "fire-and-forget" if self.disable_acks else "ack"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def load_config(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Config:
    """Read settings from ``environ`` (default ``os.environ``) over a ``.env`` file; validate all.

    The process environment wins over the ``.env`` file, as with godotenv in Tap.
    Raises ``ConfigError`` listing every invalid value.
    """
    env: dict[str, str] = dict(_read_dotenv(dotenv)) if dotenv else {}
    env.update(os.environ if environ is None else environ)
    errors: list[str] = []
    values: dict[str, object] = {}
    for s in SETTINGS:
        name, raw = next(((n, env[n]) for n in s.env if n in env), (s.env[0], s.default))
        try:
            values[s.attr] = _parse(s.kind, raw)
        except ValueError as e:
            errors.append(f"{name}={raw!r}: {e}")
    if not errors:
        errors.extend(_cross_checks(values))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    if values["repo_fetch_timeout"] <= 0:  # type: ignore[operator]
        values["repo_fetch_timeout"] = 30.0
    values["kafka_extra"] = tuple(
        (k[len("TAP_KAFKA_"):].lower().replace("_", "."), v)
        for k, v in sorted(env.items())
        if k.startswith("TAP_KAFKA_") and k not in _KAFKA_OWN
    )
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


def _parse(kind: str, raw: str) -> object:
    if kind == "str":
        return raw.strip()
    if kind == "int":
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("not an integer") from None
    if kind == "bool":
        return parse_bool(raw)
    if kind == "duration":
        return parse_duration(raw)
    if kind == "list":
        return tuple(parse_list(raw))
    if kind == "url":
        u = raw.strip()
        if not (u.startswith("http://") or u.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        return u.rstrip("/")
    if kind == "bind":
        return parse_bind(raw)
    raise AssertionError(kind)


def _cross_checks(v: dict[str, object]) -> list[str]:
    errors: list[str] = []
    db = str(v["database_url"])
    if not db.startswith(("sqlite://", "postgres://", "postgresql://")):
        errors.append(f"TAP_DATABASE_URL={db!r}: must start with sqlite://, postgres:// or postgresql://")
    if v["no_replay"] and v["full_network"]:
        errors.append("TAP_NO_REPLAY cannot be combined with TAP_FULL_NETWORK")
    for attr, env, low in (("shards", "TAP_SHARDS", 1), ("resync_parallelism", "TAP_RESYNC_PARALLELISM", 1),
                           ("outbox_capacity", "TAP_OUTBOX_CAPACITY", 1), ("ident_cache_size", "TAP_IDENT_CACHE_SIZE", 1),
                           ("kafka_partitions", "TAP_KAFKA_PARTITIONS", 1), ("kafka_replication", "TAP_KAFKA_REPLICATION", 1),
                           ("webhook_concurrency", "TAP_WEBHOOK_CONCURRENCY", 1), ("verify_workers", "TAP_VERIFY_WORKERS", 0),
                           ("max_car_size", "TAP_MAX_CAR_SIZE", 1024), ("backfill_spool_size", "TAP_BACKFILL_SPOOL_SIZE", 0),
                           ("max_frame_size", "TAP_MAX_FRAME_SIZE", 1024), ("max_body_size", "TAP_MAX_BODY_SIZE", 1024)):
        if int(v[attr]) < low:  # type: ignore[arg-type]
            errors.append(f"{env}={v[attr]}: must be at least {low}")
    if str(v["live_verify"]) not in ("auto", "pool", "inline"):
        errors.append(f"TAP_LIVE_VERIFY={v['live_verify']}: must be auto, pool or inline")
    if int(v["shards"]) > 65535:  # type: ignore[arg-type]
        errors.append("TAP_SHARDS: must be at most 65535")
    if float(v["retry_timeout"]) <= 0:  # type: ignore[arg-type]
        errors.append("TAP_RETRY_TIMEOUT: must be positive")
    if float(v["cursor_save_interval"]) <= 0:  # type: ignore[arg-type]
        errors.append("TAP_CURSOR_SAVE_INTERVAL: must be positive")
    if float(v["kafka_stall_timeout"]) <= 0:  # type: ignore[arg-type]
        errors.append("TAP_KAFKA_STALL_TIMEOUT: must be positive")
    wh = str(v["webhook_url"])
    if wh and not wh.startswith(("http://", "https://")):
        errors.append(f"TAP_WEBHOOK_URL={wh!r}: must start with http:// or https://")
    sc = str(v["signal_collection"])
    if sc:
        from protocol.syntax import is_valid_nsid

        if not is_valid_nsid(sc):
            errors.append(f"TAP_SIGNAL_COLLECTION={sc!r}: not a valid NSID")
    if v["kafka_only"] and not v["kafka_bootstrap"]:
        errors.append("TAP_KAFKA_ONLY needs TAP_KAFKA_BOOTSTRAP")
    ml = str(v["metrics_listen"])
    if ml:
        try:
            parse_bind(ml)
        except ValueError as e:
            errors.append(f"TAP_METRICS_LISTEN={ml!r}: {e}")
    for item in v["handle_resolver"]:  # type: ignore[attr-defined]
        if item not in ("dns", "https") and not item.startswith("xrpc:"):
            errors.append(f"TAP_HANDLE_RESOLVER item {item!r}: use dns, https or xrpc:<url>")
    lvl = str(v["log_level"]).lower()
    v["log_level"] = lvl if lvl in ("debug", "info", "warn", "error") else "info"
    return errors
