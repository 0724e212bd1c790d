"""Blocking wrappers for scripts: the async client on an event loop in a daemon thread.

::

    from tapflow_client import SyncTapClient

    with SyncTapClient("http://127.0.0.1:2480") as tap:
        tap.add_repos(["did:plc:ewvi7nxzyoun6zhxrhs64oiz"])
        with tap.iter_events() as events:
            for ev in events:          # acked when the loop asks for the next one
                print(ev)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterable, Iterator, Optional, TypeVar

from .channel import EventStream, Handler
from .client import DEFAULT_URL, RepoPage, TapClient
from .events import Event, RepoInfo

T = TypeVar("T")

__all__ = ["SyncTapClient", "EventIterator", "iter_events"]


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tapflow-client", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class SyncTapClient:
    """The same methods as :class:`TapClient`, blocking. Not for use inside async code."""

    def __init__(self, url: str = DEFAULT_URL, admin_password: Optional[str] = None, **options: Any):
        self._lt = _LoopThread()
        self._client: TapClient = self._lt.run(_make_client(url, admin_password, options))

    @property
    def url(self) -> str:
        return self._client.url

    def __enter__(self) -> "SyncTapClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self._lt.loop.is_closed():
            try:
                self._lt.run(self._client.close())
            finally:
                self._lt.stop()

    def add_repos(self, dids: Iterable[str]) -> None:
        self._lt.run(self._client.add_repos(list(dids)))

    def remove_repos(self, dids: Iterable[str]) -> None:
        self._lt.run(self._client.remove_repos(list(dids)))

    def info(self, did: str) -> RepoInfo:
        return self._lt.run(self._client.info(did))

    def resolve(self, did: str) -> Optional[dict[str, Any]]:
        return self._lt.run(self._client.resolve(did))

    def stats(self) -> dict[str, Any]:
        return self._lt.run(self._client.stats())

    def health(self) -> dict[str, Any]:
        return self._lt.run(self._client.health())

    def list_repos(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Iterator[RepoPage]:
        agen = self._client.list_repos(limit=limit, cursor=cursor)
        try:
            while True:
                try:
                    yield self._lt.run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._lt.run(agen.aclose())

    def run(self, handler: Handler, **options: Any) -> None:
        """Consume ``/channel`` with ``handler`` until Ctrl-C or a fatal error (blocking).

        The handler runs on the client's loop thread; a plain function is fine.
        """
        channel = self._client.channel(handler, **options)
        try:
            self._lt.run(channel.run())
        except KeyboardInterrupt:
            self._lt.run(channel.stop())

    def iter_events(self, **options: Any) -> "EventIterator":
        """Events from ``/channel``, each acked when you ask for the next one."""
        return EventIterator(self._lt, self._lt.run(_make_stream(self._client, options)))


class EventIterator:
    """A blocking iterator over an :class:`EventStream`.

    Inside ``with``: leaving normally (``break``) acks the last event, an exception does
    not. Without ``with``, the last event is not acked (it is redelivered later).
    """

    def __init__(self, lt: _LoopThread, stream: EventStream, owner: Optional[SyncTapClient] = None):
        self._lt = lt
        self._stream = stream
        self._owner = owner
        self._closed = False

    def __iter__(self) -> "EventIterator":
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        try:
            return self._lt.run(self._stream.__anext__())
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None

    def ack(self, event: Event | int) -> None:
        self._lt.run(self._stream.ack(event))

    def close(self, ack_last: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if ack_last:
                self._lt.run(self._stream._ack_last())
            self._lt.run(self._stream.aclose())
        finally:
            if self._owner is not None:
                self._owner.close()

    def __enter__(self) -> "EventIterator":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(ack_last=exc_type is None)


def iter_events(url: str = DEFAULT_URL, admin_password: Optional[str] = None, **options: Any) -> EventIterator:
    """Shortcut: ``for ev in iter_events("http://127.0.0.1:2480"): ...`` (blocking)."""
    owner = SyncTapClient(url, admin_password)
    return EventIterator(owner._lt, owner._lt.run(_make_stream(owner._client, options)), owner)


async def _make_client(url: str, admin_password: Optional[str], options: dict[str, Any]) -> TapClient:
    return TapClient(url, admin_password, **options)


async def _make_stream(client: TapClient, options: dict[str, Any]) -> EventStream:
    return client.events(**options)
