"""The delivery child process: ``python -m connectors.delivery_main``.

Started by the flow process (``runtime.supervisor``); it dies with its parent
(PR_SET_PDEATHSIG). It reads the same ``TAP_*`` settings, follows ``data/flow`` as a RocksDB
secondary and owns ``data/delivery``:

- the outbox follower feeds the delivery targets of the configured mode: ``/channel``
  (ack or fire-and-forget), webhook, and/or Kafka (``TAP_KAFKA_BOOTSTRAP``);
- the HTTP API listens on ``TAP_BIND`` (``connectors.api``);
- SIGTERM / SIGINT stop it cleanly: WebSocket clients are dropped at the TCP level (no close
  frame, so official clients reconnect to the next process), taken events are flushed to
  ``acks`` as a last ack batch; everything else is redelivered by the next process.

Logs are JSON lines on stdout. Metrics go to prometheus_client's multiprocess directory that
the flow process serves on ``TAP_METRICS_LISTEN``; run alone (no ``TAPFLOW_PARENT_PID``), this
process serves ``/metrics`` there itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from config import Config, ConfigError, load_config, parse_bind
from store.pairing import PairingError, adopt_incarnation
from runtime.memory import tune_gc

log = logging.getLogger("tapflow.delivery")

PRUNE_INTERVAL = 5.0
GAUGE_INTERVAL = 1.0


def target_factories(cfg: Config) -> list:
    """The delivery targets of ``cfg``'s mode, as factories taking ``on_taken``."""
    factories = []
    mode = cfg.delivery_mode
    if mode in ("ack", "fire-and-forget"):
        from connectors.channel import ChannelTarget

        factories.append(lambda on_taken: ChannelTarget(cfg, on_taken))
    elif mode == "webhook":
        from connectors.webhook import WebhookTarget

        factories.append(lambda on_taken: WebhookTarget(cfg, on_taken))
    if cfg.kafka_bootstrap:
        from connectors.kafka import KafkaTarget

        factories.append(lambda on_taken: KafkaTarget(cfg, on_taken))
    return factories


def clean_stale_secondaries(data_dir: str) -> int:
    """Remove ``<data_dir>/secondary/<db>-<pid>`` dirs of processes that are gone.

    Every process that follows a database as a RocksDB secondary gets such a dir (its own
    MANIFEST copy and logs); restarts would otherwise pile them up.
    """
    import shutil

    root = Path(data_dir) / "secondary"
    removed = 0
    if not root.is_dir():
        return 0
    for d in root.iterdir():
        name, _, pid = d.name.rpartition("-")
        if not name or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


async def _wait_for_flow_db(cfg: Config, stop: asyncio.Event):
    from store.db import StoreError, open_flow_db

    current = Path(cfg.data_dir) / "flow" / "CURRENT"
    logged = False
    while not stop.is_set():
        if current.exists():
            try:
                return open_flow_db(cfg.data_dir, secondary=True)
            except StoreError as e:
                if not logged:
                    log.info("flow database not ready yet", extra={"error": str(e)})
                    logged = True
        elif not logged:
            log.info("waiting for the flow database", extra={"path": str(current.parent)})
            logged = True
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
    return None


async def _metrics_site(cfg: Config) -> web.AppRunner | None:
    if not cfg.metrics_listen or os.environ.get("TAPFLOW_PARENT_PID"):
        return None  # the flow process serves the sum of both processes
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    host, port = parse_bind(cfg.metrics_listen)
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve(cfg: Config, stop: asyncio.Event | None = None, *, started: asyncio.Event | None = None) -> None:
    """Run delivery and the API until ``stop`` is set."""
    from connectors.api import Api, CommandLog
    from connectors.channel import ChannelTarget
    from connectors.outbox_follower import OutboxFollower
    from store.db import open_delivery_db

    stop = stop or asyncio.Event()
    if clean_stale_secondaries(cfg.data_dir):
        log.info("removed secondary dirs of exited processes")
    delivery = open_delivery_db(cfg.data_dir)
    flow = await _wait_for_flow_db(cfg, stop)
    if flow is None:
        return
    adopt_incarnation(flow, delivery)  # PairingError: main() exits 2, the flow process refused already
    factories = target_factories(cfg)
    follower = OutboxFollower(cfg, flow, delivery, factories) if factories else None
    channel = next((t for t in follower.targets if isinstance(t, ChannelTarget)), None) if follower else None
    directory = None
    try:
        from protocol.identity import Directory

        directory = Directory.from_config(cfg)
    except Exception:
        log.exception("identity directory unavailable: /resolve will answer 500")
    commands = CommandLog(delivery, flow)
    api = Api(cfg, flow, commands, channel_handler=channel.handle if channel else None, directory=directory)
    runner = web.AppRunner(api.app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    host, port = cfg.bind
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    metrics_runner = await _metrics_site(cfg)
    tasks = []
    if follower is not None:
        await follower.start()
        tasks.append(asyncio.create_task(follower.run(), name="outbox-follower"))
    tasks.append(asyncio.create_task(_housekeeping(commands, follower, flow, stop), name="housekeeping"))
    log.info("delivery started", extra={"bind": f"{host}:{port}", "mode": cfg.delivery_mode,
                                        "targets": [t.name for t in follower.targets] if follower else []})
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        log.info("delivery stopping")
        if channel is not None:
            channel.abort_all()  # first: no client gets a close frame from the shutdown below
        if follower is not None:
            await follower.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if directory is not None:
            try:
                await directory.close()
            except Exception:
                pass
        log.info("delivery stopped", extra={"offered": follower.offered if follower else 0})


async def _housekeeping(commands, follower, flow, stop: asyncio.Event) -> None:
    from connectors.targets import metrics

    m = metrics()
    last_prune = 0.0
    while not stop.is_set():
        await asyncio.sleep(GAUGE_INTERVAL)
        try:
            now = time.monotonic()
            if now - last_prune >= PRUNE_INTERVAL:
                last_prune = now
                commands.prune()
            if follower is not None:
                m.event_cache_size.set(follower.in_flight)
            m.outbox_depth.set(_outbox_depth(flow))
        except Exception:
            log.exception("housekeeping failed")


def _outbox_depth(flow) -> int:
    from store.db import outbox_depth

    return max(0, outbox_depth(flow))


def main() -> int:
    try:
        cfg = load_config()
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from runtime.logs import setup_logging
    from runtime.supervisor import set_parent_death_signal

    setup_logging(cfg.log_level, "delivery")
    set_parent_death_signal(signal.SIGTERM)
    tune_gc()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    try:
        asyncio.run(run())
    except OSError as e:  # e.g. TAP_BIND in use
        log.error("delivery failed to start", extra={"error": str(e)})
        return 1
    except PairingError as e:
        log.error("delivery database belongs to another flow database", extra={"error": str(e)})
        return 2
    except Exception:
        log.exception("delivery failed")
        return 1
    finally:
        from store.db import close_all

        close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
