"""The tapflow dataflow: sources -> one key -> RepoLogic -> rejections sink.

RepoLogic writes state and outbox events to RocksDB itself (one WriteBatch per activation);
what flows out of it are only the counted rejections (the ``errs`` stream). Delivery runs in
the delivery child, following the outbox.

Every item goes under ONE key: tapflow runs one bytewax worker (``runtime.topology``), and
RepoLogic handles items of any shard in one ``process`` call (each item's shard comes from
its DID), so a key per shard only split an activation into one call and one RocksDB write
per shard: a live batch of N commits spread over ~N of the 64 shards cost ~N writes (in
30-commit batches, about half of RepoLogic's CPU per commit beyond verification:
``bench/repo_live.py --per-shard`` against without).
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from config import Config
from connectors.backfill import BackfillSource
from connectors.control import ControlSource
from connectors.crawler import CrawlerSource
from connectors.firehose import FirehoseSource
from operators.rejections import RejectionSink
from operators.repo import repo_logic_builder

_KEY = "repos"


def _one_key(_item: object) -> str:
    return _KEY


def build_flow(cfg: Config) -> Dataflow:
    """Wire the sources that ``cfg`` enables into RepoLogic."""
    flow = Dataflow("tapflow")
    streams = [op.input("control", flow, ControlSource(cfg))]
    if not cfg.outbox_only:
        streams.append(op.input("firehose", flow, FirehoseSource(cfg)))
        streams.append(op.input("backfill", flow, BackfillSource(cfg)))
        if cfg.full_network or cfg.signal_collection:
            streams.append(op.input("crawler", flow, CrawlerSource(cfg)))
    items = op.merge("items", *streams)
    keyed = op.key_on("one_key", items, _one_key)
    rejected = op.stateful_batch("repo_logic", keyed, repo_logic_builder(cfg))
    op.output("rejections", op.key_rm("unkey", rejected), RejectionSink())
    return flow
