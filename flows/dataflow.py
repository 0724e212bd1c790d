"""The tapflow dataflow: sources -> key by repo shard -> RepoLogic -> rejections sink.

RepoLogic writes state and outbox events to RocksDB itself (one WriteBatch per shard
activation); what flows out of it are only the counted rejections (the ``errs`` stream).
Delivery runs in the delivery child, following the outbox.
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
from store.layout import shard_of


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
    shards = cfg.shards
    keyed = op.key_on("by_shard", items, lambda item: str(shard_of(item.did, shards)))
    rejected = op.stateful_batch("repo_logic", keyed, repo_logic_builder(cfg))
    op.output("rejections", op.key_rm("unkey", rejected), RejectionSink())
    return flow
