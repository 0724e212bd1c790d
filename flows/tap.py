"""The tapflow service: ``python -m bytewax.run flows.tap``.

Wiring only: read and check the settings, set up logs and metrics, start the delivery
child (HTTP API, /channel, webhook, Kafka), and build the dataflow.
"""

from __future__ import annotations

import os
import sys

from config import ConfigError, load_config
from runtime.topology import TopologyError, check_topology

try:
    _cfg = load_config()
    check_topology(sys.argv, os.environ)
except (ConfigError, TopologyError) as _e:
    print(str(_e), file=sys.stderr)
    raise SystemExit(2) from None

from runtime.memory import limit_malloc_arenas, tune_gc  # noqa: E402

limit_malloc_arenas()  # before any thread or child process starts

from runtime.metrics import prepare_multiprocess  # noqa: E402  (before prometheus_client loads)

prepare_multiprocess(_cfg.data_dir, fresh=True)

from runtime.procpool import start_pool  # noqa: E402

if not _cfg.outbox_only:  # TAP_OUTBOX_ONLY verifies nothing: no worker processes
    start_pool(_cfg.verify_workers, lanes=_cfg.live_verify_in_pool)  # spawn-started, before any RocksDB opens

from flows.dataflow import build_flow  # noqa: E402
from runtime.service import start_service  # noqa: E402

start_service(_cfg)
flow = build_flow(_cfg)
tune_gc()  # what is loaded by now lives as long as the process
