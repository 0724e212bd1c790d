"""Start the delivery child (API, /channel, webhook, Kafka) and keep it alive.

The flow process owns the child: the child is started with ``subprocess`` (fork + exec at
once, so no RocksDB handle is shared), it asks the kernel to kill it when the parent dies
(PR_SET_PDEATHSIG, in the child), and it is restarted with capped backoff if it dies on its
own. ``python -m bytewax.run flows.tap`` therefore stays the whole service.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHILD_MODULE = "connectors.delivery_main"


class DeliveryChild:
    """The delivery process: started once, restarted when it exits unexpectedly."""

    def __init__(self, cwd: Path | None = None) -> None:
        self._cwd = cwd
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="delivery-supervisor", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["TAPFLOW_PARENT_PID"] = str(os.getpid())
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE], env=env, cwd=self._cwd)
        log.info("delivery child started", extra={"pid": self._proc.pid})

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            code = proc.poll()
            if code is None:
                if failures and time.monotonic() - self._started_at > 30:
                    failures = 0
                self._stopping.wait(0.2)
                continue
            if self._stopping.is_set():
                return
            from runtime.metrics import mark_process_dead

            mark_process_dead(proc.pid)
            failures += 1
            delay = min(2 ** min(failures, 5), 30)
            log.error("delivery child exited; restarting", extra={"code": code, "restart_in_s": delay})
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            self._started_at = time.monotonic()

    _started_at = 0.0

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the child, SIGKILL it after ``timeout``."""
        self._stopping.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """In a child: ask Linux to send ``sig`` when the parent dies (no orphans after kill -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        log.warning("PR_SET_PDEATHSIG unavailable; the delivery child may outlive its parent")
    parent = os.environ.get("TAPFLOW_PARENT_PID")
    if parent and os.getppid() != int(parent):  # parent died before prctl took effect
        os.kill(os.getpid(), sig)
