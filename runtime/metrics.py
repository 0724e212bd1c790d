"""Prometheus metrics across tapflow's two processes.

Both processes count into prometheus_client's multiprocess files under
``<data_dir>/metrics`` (set up before prometheus_client is first imported), and the flow
process serves the sum on ``TAP_METRICS_LISTEN`` at ``/metrics``. Gauges that only one
process sets use ``multiprocess_mode="livemax"`` or similar; the default ("all") gives one
series per pid, which is also fine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(data_dir: str, fresh: bool) -> Path:
    """Point prometheus_client at ``<data_dir>/metrics``; ``fresh`` wipes old files (flow start).

    Must run before anything imports prometheus_client in this process.
    """
    path = Path(data_dir) / "metrics"
    if fresh and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    return path


def serve_metrics(listen: tuple[str, int]) -> None:
    """Serve the multiprocess sum at http://host:port/metrics (a daemon thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(listen[1], addr=listen[0], registry=registry)


def mark_process_dead(pid: int) -> None:
    """Drop live gauges of a child that exited (prometheus multiprocess bookkeeping)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
