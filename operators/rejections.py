"""The ``errs`` stream's end: every rejection is logged with its DID and reason, and counted."""

from __future__ import annotations

import logging

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import Counter

from operators.items import Rejected

log = logging.getLogger("tapflow.rejected")

REJECTED = Counter("tapflow_rejected_total", "Inputs rejected (bad frames, failed verification, ...)", ["source", "reason"])


def record_rejection(r: Rejected) -> None:
    """Count and log one rejection."""
    REJECTED.labels(r.source, r.reason).inc()
    log.warning("rejected", extra={"did": r.did, "source": r.source, "reason": r.reason, "detail": r.detail[:500], **r.extra})


class _Partition(StatelessSinkPartition[Rejected]):
    def write_batch(self, items: list[Rejected]) -> None:
        for r in items:
            if isinstance(r, Rejected):
                record_rejection(r)


class RejectionSink(DynamicSink[Rejected]):
    """Logs and counts the rejections RepoLogic returns."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition()
