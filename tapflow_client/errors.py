"""Exceptions of the tapflow client. All derive from :class:`TapError`."""

from __future__ import annotations


class TapError(Exception):
    """Base class of every error raised by tapflow_client."""


class ParseError(TapError, ValueError):
    """A frame, webhook body or response that is not what Tap sends (never acked).

    ``frame`` holds the raw text when the error came from the channel or Kafka.
    """

    frame: str | None = None


class TapUnreachable(TapError, ConnectionError):
    """The service could not be reached (connection refused, DNS failure, timeout)."""

    def __init__(self, url: str, cause: BaseException | None = None):
        self.url = url
        self.cause = cause
        detail = f" ({cause})" if cause is not None and str(cause) else ""
        super().__init__(f"tapflow is not reachable at {url}{detail}")


class TapHTTPError(TapError):
    """The service answered with a non-2xx status."""

    def __init__(self, status: int, message: str, *, method: str = "", url: str = ""):
        self.status = status
        self.message = message
        self.method = method
        self.url = url
        where = f"{method} {url}: " if method else ""
        super().__init__(f"{where}{status} {message}".strip())


class AuthError(TapHTTPError):
    """401: the admin password is missing or wrong."""


class NotFound(TapHTTPError):
    """404: e.g. ``info()`` for a repo that is not tracked."""


class HandlerError(TapError):
    """Your handler raised while processing an event; the event was not acked.

    ``event`` is the event, ``__cause__`` the original exception.
    """

    def __init__(self, event: object, cause: BaseException):
        self.event = event
        eid = getattr(event, "id", "?")
        super().__init__(f"failed to process event {eid}: {cause!r}")
        self.__cause__ = cause


class ChannelClosed(TapError):
    """The server ended the channel with a close frame we do not reconnect after."""

    def __init__(self, code: int, reason: str = ""):
        self.code = code
        self.reason = reason
        super().__init__(f"channel closed by the server with code {code}" + (f": {reason}" if reason else ""))
