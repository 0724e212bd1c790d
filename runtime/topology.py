"""The one bytewax topology tapflow runs: one process, one worker.

``data/flow`` is a single-writer RocksDB, event ids come from one allocator, and the
delivery child follows one flow database; a second bytewax worker or process would
either wedge on the database lock or hand out the same ids twice. Parallelism comes from
the verification pool (``TAP_VERIFY_WORKERS`` processes verify commits and CARs beside the
worker) and the delivery child. This check turns bytewax's ``-w``/``-i``/``-a`` (and their
``BYTEWAX_*`` variables) into a clear error at start instead of a crash ten seconds in.
"""

from __future__ import annotations

import argparse
from typing import Mapping, Sequence


class TopologyError(ValueError):
    """The command line asks for a bytewax topology tapflow does not run."""


def _scaling_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-w", "--workers-per-process", type=int)
    p.add_argument("-i", "--process-id", type=int)
    p.add_argument("-a", "--addresses")
    ns, _ = p.parse_known_args(list(argv[1:]))
    return ns


def check_topology(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Raise ``TopologyError`` unless the run is one process with one worker."""
    try:
        ns = _scaling_args(argv)
    except SystemExit:  # argparse refuses e.g. "-w two": bytewax's own parser says why
        return
    workers = ns.workers_per_process
    if workers is None and env.get("BYTEWAX_WORKERS_PER_PROCESS"):
        try:
            workers = int(env["BYTEWAX_WORKERS_PER_PROCESS"])
        except ValueError:
            workers = None
    addresses = ns.addresses or env.get("BYTEWAX_ADDRESSES") or ""
    problems = []
    if workers is not None and workers > 1:
        problems.append(f"-w/BYTEWAX_WORKERS_PER_PROCESS={workers}")
    if len([a for a in addresses.split(";") if a.strip()]) > 1:
        problems.append("-a/BYTEWAX_ADDRESSES with several processes")
    if problems:
        raise TopologyError(
            "tapflow runs as one bytewax process with one worker (" + ", ".join(problems) + " given): "
            "its state is a single-writer RocksDB with one event-id allocator. Verification already "
            "runs in TAP_VERIFY_WORKERS processes beside the worker; raise that instead.")
