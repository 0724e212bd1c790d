"""Receiving events as webhook POSTs (``TAP_WEBHOOK_URL``).

Tap POSTs each event as the same JSON a ``/channel`` frame carries, with
``Authorization: Basic base64("admin:<TAP_ADMIN_PASSWORD>")`` when a password is set.
Any 2xx acks the event; anything else makes Tap retry it (1, 2, 4, 8, 10, 10... s).

In any web framework::

    if not check_admin_auth(request.headers.get("Authorization"), PASSWORD):
        return 401
    try:
        ev = parse_webhook_body(await request.body())
    except ParseError:
        return 400          # never acked: Tap retries, so log it loudly
    await store(ev)         # raise -> 500 -> Tap retries
    return 200

or let :func:`webhook_app` build a small aiohttp app that does exactly that.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import logging
from typing import Any, Optional

from .channel import Handler, format_admin_auth
from .errors import ParseError
from .events import Event, parse_event

__all__ = ["parse_webhook_body", "check_admin_auth", "format_admin_auth", "webhook_app"]

log = logging.getLogger("tapflow_client.webhook")


def parse_webhook_body(body: bytes | str) -> Event:
    """Parse one webhook body into an event (:class:`ParseError` if it is not a valid one)."""
    return parse_event(body)


def check_admin_auth(header: Optional[str], password: str) -> bool:
    """True if ``header`` carries user ``admin`` and ``password`` (constant-time compare).

    Like the official ``assureAdminAuth``, the ``Basic `` prefix is optional. Unlike it,
    a password containing ``:`` is compared whole.
    """
    if not header:
        hmac.compare_digest(password.encode(), password.encode())
        return False
    token = header[6:] if header.startswith("Basic ") else header
    try:
        decoded = base64.b64decode(token.strip() + "=" * (-len(token.strip()) % 4), validate=False)
        text = decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        hmac.compare_digest(password.encode(), password.encode())
        return False
    user, sep, given = text.partition(":")
    ok_pw = hmac.compare_digest(given.encode(), password.encode())
    return bool(sep) and user == "admin" and ok_pw


def webhook_app(handler: Handler, password: Optional[str] = None, path: str = "/") -> Any:
    """An ``aiohttp.web.Application`` receiving Tap webhooks at ``path``.

    401 on bad auth (when ``password`` is set), 400 for a body that is not a valid event,
    500 when ``handler`` raises (Tap retries), 200 after it returned (Tap acks).
    """
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        if password and not check_admin_auth(request.headers.get("Authorization"), password):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.read()
        try:
            ev = parse_webhook_body(body)
        except ParseError as e:
            log.error("webhook body rejected (Tap will retry it): %s", e)
            return web.json_response({"error": "BadRequest", "message": str(e)}, status=400)
        try:
            res = handler(ev)
            if inspect.isawaitable(res):
                await res
        except Exception as e:  # noqa: BLE001 - Tap retries
            log.exception("webhook handler failed for event %s", ev.id)
            return web.json_response({"error": "HandlerFailed", "message": repr(e)}, status=500)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post(path, receive)
    return app
