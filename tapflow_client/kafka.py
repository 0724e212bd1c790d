"""Tap events from tapflow's Kafka topic (``TAP_KAFKA_BOOTSTRAP``), in a consumer group.

tapflow produces every event to ``<TAP_KAFKA_TOPIC_PREFIX>events`` (``tap.events``), keyed
by DID, the value being exactly the JSON a ``/channel`` frame carries. So one repo's events
stay in one partition, in order, and consumers scale out by adding group members.

::

    from tapflow_client.kafka import kafka_events

    with kafka_events("127.0.0.1:9092", group_id="my-indexer") as events:
        for ev in events:
            store(ev)   # returns -> its offset may be committed; raises -> it is not

Offsets are committed by hand (``enable.auto.commit=false``) and only for events whose
loop body returned: the offset of an event is marked done when you ask for the next one,
and done offsets are committed every ``commit_interval`` seconds, on a partition
revocation, and when the iterator closes. After a crash, processing resumes at the first
event not known done: at-least-once, so make your writes idempotent (upserts).

A message that is not a valid event is passed to ``on_error`` (default: logged) and
skipped: unlike ``/channel``, a Kafka partition cannot hold one message back.

Needs ``confluent-kafka`` (a tapflow dependency; ``pip install confluent-kafka`` otherwise).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Optional

from .errors import ParseError, TapError
from .events import Event, parse_event

__all__ = ["kafka_events", "KafkaEventIterator"]

log = logging.getLogger("tapflow_client.kafka")


def kafka_events(bootstrap: str, group_id: str, topic: str = "tap.events", *,
                 commit_interval: float = 1.0, poll_timeout: float = 1.0,
                 idle_timeout: Optional[float] = None,
                 on_error: Optional[Callable[[Exception], None]] = None,
                 **conf: Any) -> "KafkaEventIterator":
    """Iterate events of ``topic`` as member of consumer group ``group_id``.

    ``conf`` goes to the Kafka consumer; underscores become dots, so
    ``security_protocol="SASL_SSL"`` is ``security.protocol``. Defaults:
    ``auto.offset.reset=earliest``. ``idle_timeout`` ends the iteration after that many
    seconds without a message once partitions are assigned (handy for batch jobs and tests);
    None waits forever.
    """
    try:
        from confluent_kafka import Consumer
    except ImportError as e:  # pragma: no cover - tapflow depends on it
        raise TapError("kafka_events needs confluent-kafka: pip install confluent-kafka") from e
    settings: dict[str, Any] = {"auto.offset.reset": "earliest"}
    settings.update({k.replace("_", "."): v for k, v in conf.items()})
    settings.update({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False,
                     "enable.auto.offset.store": False})
    consumer = Consumer(settings)
    return KafkaEventIterator(consumer, topic, commit_interval=commit_interval, poll_timeout=poll_timeout,
                              idle_timeout=idle_timeout, on_error=on_error)


class KafkaEventIterator:
    """See :func:`kafka_events`. Inside ``with``, leaving normally marks the last event done."""

    def __init__(self, consumer: Any, topic: str, *, commit_interval: float, poll_timeout: float,
                 idle_timeout: Optional[float], on_error: Optional[Callable[[Exception], None]]):
        self.consumer = consumer
        self.topic = topic
        self.commit_interval = commit_interval
        self.poll_timeout = poll_timeout
        self.idle_timeout = idle_timeout
        self.on_error = on_error or (lambda e: log.error("%s", e))
        self._done: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to read
        self._last: Optional[tuple[str, int, int]] = None
        self._last_commit = time.monotonic()
        self._closed = False
        self._assigned = False
        consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        self._mark_last()
        idle_since = time.monotonic()
        while True:
            if time.monotonic() - self._last_commit >= self.commit_interval:
                self.commit()
            msg = self.consumer.poll(self.poll_timeout)
            if msg is None:
                if not self._assigned:
                    idle_since = time.monotonic()  # joining the group is not idleness
                elif self.idle_timeout is not None and time.monotonic() - idle_since >= self.idle_timeout:
                    self.close(mark_last=False)
                    raise StopIteration
                continue
            err = msg.error()
            if err is not None:
                if err.code() == -191:  # _PARTITION_EOF
                    continue
                if err.fatal():
                    raise TapError(f"Kafka consumer failed: {err}")
                log.warning("kafka: %s", err)
                continue
            idle_since = time.monotonic()
            value = msg.value()
            if value is None:  # not produced by tapflow on the events topic; skip
                self._done[(msg.topic(), msg.partition())] = msg.offset() + 1
                continue
            try:
                ev = parse_event(value)
            except ParseError as e:
                e.frame = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                self.on_error(e)
                self._done[(msg.topic(), msg.partition())] = msg.offset() + 1
                continue
            self._last = (msg.topic(), msg.partition(), msg.offset())
            return ev

    def _mark_last(self) -> None:
        if self._last is not None:
            topic, part, off = self._last
            self._done[(topic, part)] = off + 1
            self._last = None

    def commit(self) -> None:
        """Commit every offset marked done (synchronously)."""
        self._last_commit = time.monotonic()
        if not self._done:
            return
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [TopicPartition(t, p, o) for (t, p), o in self._done.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            # e.g. no longer assigned after a rebalance: the new owner re-reads from the
            # last committed offset (at-least-once)
            log.warning("kafka: commit failed: %s", e)
            return
        self._done.clear()

    def _on_assign(self, consumer: Any, partitions: list) -> None:
        self._assigned = True

    def _on_revoke(self, consumer: Any, partitions: list) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        if self._last is not None and (self._last[0], self._last[1]) in revoked:
            self._last = None  # not processed yet: the next owner gets it
        self.commit()
        for key in revoked:
            self._done.pop(key, None)

    def close(self, mark_last: bool = False) -> None:
        """Commit what is done and leave the group."""
        if self._closed:
            return
        self._closed = True
        if mark_last:
            self._mark_last()
        try:
            self.commit()
        finally:
            self.consumer.close()

    def __enter__(self) -> "KafkaEventIterator":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(mark_last=exc_type is None)
