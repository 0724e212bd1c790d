"""Process start-up of the flow process: logs, data dir, metrics, the delivery child."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from config import Config
from runtime.logs import safe_settings, setup_logging
from runtime.metrics import serve_metrics
from runtime.shutdown import install as install_signal_handlers
from runtime.supervisor import DeliveryChild
from store.pairing import PairingError, check_pairing

log = logging.getLogger("tapflow")

_child: DeliveryChild | None = None


def start_service(cfg: Config) -> None:
    """Everything the flow process does once before bytewax runs the dataflow."""
    global _child
    setup_logging(cfg.log_level, "flow")
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)  # state and outbox may hold private repo data: owner only
    log.info("tapflow starting", extra={"settings": safe_settings(cfg)})
    if cfg.metrics_listen:
        from config import parse_bind

        serve_metrics(parse_bind(cfg.metrics_listen))
    install_signal_handlers()
    try:
        check_pairing(data)
    except PairingError as e:
        log.error("data directory does not pair", extra={"error": str(e)})
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None
    if _child is None:
        _child = DeliveryChild()
        _child.start()
