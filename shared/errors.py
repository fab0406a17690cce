"""One exception tree for everything a client can be told.

Each class carries the `error` code and the WebSocket close code that protocol.md
assigns to it; `gateway.session` maps them to the wire in one place.
"""

from __future__ import annotations


class StreamscribeError(Exception):
    """Base of every error that maps to a protocol `error` message and close code."""

    code: str = "internal"
    close_code: int = 1011
    #: Fatal errors close the connection after the `error` message.
    fatal: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(StreamscribeError):
    """Invalid query parameter or message field (4400)."""

    code = "bad_request"
    close_code = 4400


class Unauthorized(StreamscribeError):
    """Missing or invalid credentials (4401)."""

    code = "unauthorized"
    close_code = 4401


class Forbidden(StreamscribeError):
    """Resume token does not match the session, or resume expected (4403)."""

    code = "forbidden"
    close_code = 4403


class NotFound(StreamscribeError):
    """Unknown or expired session (4404)."""

    code = "not_found"
    close_code = 4404


class FrameTooLarge(StreamscribeError):
    """A frame larger than the gateway's message limit (1009)."""

    code = "frame_too_large"
    close_code = 1009


class ProtocolViolation(StreamscribeError):
    """Text frame that is not JSON, unknown message type, message in the wrong state (1008)."""

    code = "protocol_violation"
    close_code = 1008


class Overloaded(StreamscribeError):
    """No capacity now; try again later (1013)."""

    code = "overloaded"
    close_code = 1013


class RateLimited(StreamscribeError):
    """Over a quota or rate limit (4429)."""

    code = "rate_limited"
    close_code = 4429


class Internal(StreamscribeError):
    """Anything unexpected: sent as 1011 without details, logged with the traceback."""

    code = "internal"
    close_code = 1011


class SessionFailed(Internal):
    """The session kept failing on workers and was dead-lettered (1011, with the reason)."""


class EnvelopeError(ValueError):
    """A stream entry or pub/sub message with an unknown version or tag, or malformed."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable or flag at fault."""
