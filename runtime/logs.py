"""JSON-line logging for both processes, and counted rejections.

Every module logs with ``logging.getLogger(__name__)`` and structured ``extra`` fields;
this formatter turns each record into one JSON object per line on stdout. Secrets never
reach it: settings are logged through ``safe_settings``.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, and every ``extra`` field."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "proc": self._process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, process: str) -> None:
    """Route all logging to stdout as JSON lines at ``level`` (debug/info/warn/error)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(process))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for noisy in ("aiohttp.access", "websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


SECRET_FIELDS = frozenset({"admin_password"})
#: Kafka passthrough settings (``TAP_KAFKA_*`` -> librdkafka keys) whose values are masked: any key
#: naming a password, secret, key, token, credential or free-form config (``sasl.oauthbearer.config``
#: may carry a client secret, ``sasl.jaas.config`` a password).
SECRET_KAFKA_WORDS = ("password", "secret", "key", "token", "credential", "config", "jaas")
_USERINFO = re.compile(r"(?<=://)([^/@\s:]*):[^/@\s]*@")


def mask_url(value: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (any occurrence)."""
    return _USERINFO.sub(r"\1:***@", value)


def safe_settings(cfg: object) -> dict:
    """Settings for the start-up log line, secrets masked: the admin password, Kafka passwords,
    secrets and configs, and the password of any ``user:password@`` in a URL (TAP_DATABASE_URL,
    TAP_WEBHOOK_URL, ...)."""
    from dataclasses import asdict

    d = asdict(cfg)  # type: ignore[arg-type]
    for k, v in d.items():
        if isinstance(v, str) and "@" in v:
            d[k] = mask_url(v)
    for k in SECRET_FIELDS:
        if d.get(k):
            d[k] = "***"
    d["kafka_extra"] = [(k, "***" if any(w in k for w in SECRET_KAFKA_WORDS) else mask_url(v))
                        for k, v in d.get("kafka_extra", ())]
    return d
