"""websockets' server connection, with the protocol's `error` message before the one
close it makes itself.

A message larger than `max_frame_bytes` never reaches gateway code: websockets' parser
stops at the frame header (without buffering the payload) and fails the connection with
1009 at once. The protocol asks for `{"type": "error", "code": "frame_too_large", ...}`
before every fatal close, so the connection's `fail` is wrapped to queue that text frame
just ahead of the close frame. Every other close goes through `gateway.connection`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ProtocolError
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.server import ServerProtocol

from shared.errors import FrameTooLarge
from shared.protocol import build_server_message, error_message


def too_large_text(limit: int | None, reason: str) -> str:
    """The `error` message sent before websockets' own 1009."""
    where = f"max_frame_bytes ({limit} bytes)" if limit is not None else "the gateway's limit"
    return build_server_message(
        error_message(FrameTooLarge(f"message larger than {where}: {reason}"))
    )


class GatewayServerConnection(ServerConnection):
    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, *args, **kwargs)
        fail = protocol.fail

        def fail_with_error(code: CloseCode | int, reason: str = "") -> None:
            if code == CloseCode.MESSAGE_TOO_BIG and protocol.state is State.OPEN:
                # A fragmented message of ours in progress would refuse it; we send none.
                with contextlib.suppress(ProtocolError):
                    limit = getattr(protocol, "max_message_size", None)  # websockets >= 15
                    text = too_large_text(limit, reason)
                    protocol.send_text(text.encode())
            fail(code, reason)

        protocol.fail = fail_with_error  # type: ignore[method-assign]
