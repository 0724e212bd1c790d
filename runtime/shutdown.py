"""Graceful stop: SIGTERM or SIGINT ends every source, so bytewax drains and exits 0.

The first signal sets ``STOP``; each source partition then raises ``StopIteration`` from
``next_batch`` (bytewax's end-of-input), RepoLogic writes what it already has, sources'
``close()`` save their cursors, and the process exits normally (the delivery child is
stopped at exit). A second signal interrupts at once. Sources keep their idle waits short
(``cap_awake``) so a stop is seen within half a second.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime, timedelta, timezone

log = logging.getLogger(__name__)

STOP = threading.Event()
_MAX_IDLE = timedelta(milliseconds=500)


def install() -> None:
    """Handle SIGTERM and SIGINT (also when SIGINT was inherited as ignored)."""

    def _handler(signum, frame):  # noqa: ARG001
        if STOP.is_set():
            raise KeyboardInterrupt
        log.info("stop requested; draining", extra={"signal": signal.Signals(signum).name})
        STOP.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def check_stop() -> None:
    """Call first in every ``next_batch``: ends the partition once a stop was requested."""
    if STOP.is_set():
        raise StopIteration


def cap_awake(when: datetime | None) -> datetime | None:
    """An idle wait no longer than half a second, so ``check_stop`` runs soon after a signal."""
    if when is None:
        return None
    latest = datetime.now(timezone.utc) + _MAX_IDLE
    return min(when, latest)
