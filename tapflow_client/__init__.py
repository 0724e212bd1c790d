"""tapflow_client: a small Python client for Tap and tapflow (atproto repo sync).

The same contract as the official TypeScript client ``@atproto/tap``::

    import asyncio
    from tapflow_client import TapClient, RecordEvent

    async def main():
        async with TapClient("http://127.0.0.1:2480", admin_password=None) as tap:
            await tap.add_repos(["did:plc:ewvi7nxzyoun6zhxrhs64oiz"])

            async def handle(ev):                 # returns -> acked; raises -> redelivered
                if isinstance(ev, RecordEvent):
                    print(ev.action, ev.uri, ev.record)
                else:
                    print("identity", ev.did, ev.handle, ev.status)

            await tap.channel(handle).run()       # reconnects by itself; Ctrl-C to stop

    asyncio.run(main())

Scripts without asyncio: :class:`SyncTapClient` / :func:`iter_events`. Webhook receivers:
:func:`parse_webhook_body`, :func:`check_admin_auth`. Kafka: ``tapflow_client.kafka.kafka_events``.
See docs/client.md.
"""

from .channel import EventStream, TapChannel, format_admin_auth
from .client import DEFAULT_URL, RepoPage, TapClient
from .errors import (AuthError, ChannelClosed, HandlerError, NotFound, ParseError, TapError, TapHTTPError,
                     TapUnreachable)
from .events import Event, IdentityEvent, RecordEvent, RepoInfo, parse_event
from .sync import EventIterator, SyncTapClient, iter_events
from .webhook import check_admin_auth, parse_webhook_body, webhook_app


def __getattr__(name: str):  # lazy: confluent-kafka is only imported when asked for
    if name == "kafka_events":
        from .kafka import kafka_events

        return kafka_events
    raise AttributeError(name)


__version__ = "0.1.0"

__all__ = [
    "TapClient", "TapChannel", "EventStream", "RepoPage", "DEFAULT_URL",
    "SyncTapClient", "EventIterator", "iter_events",
    "Event", "RecordEvent", "IdentityEvent", "RepoInfo", "parse_event",
    "parse_webhook_body", "check_admin_auth", "format_admin_auth", "webhook_app", "kafka_events",
    "TapError", "ParseError", "TapUnreachable", "TapHTTPError", "AuthError", "NotFound", "HandlerError",
    "ChannelClosed",
]
