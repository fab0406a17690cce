"""websockets' server connection, with the protocol's `error` message before the one
close it makes itself, and audio frames handed over in the protocol callback.

A message larger than `max_frame_bytes` never reaches gateway code: websockets' parser
stops at the frame header (without buffering the payload) and fails the connection with
1009 at once. The protocol asks for `{"type": "error", "code": "frame_too_large", ...}`
before every fatal close, so the connection's `fail` is wrapped to queue that text frame
just ahead of the close frame. Every other close goes through `gateway.connection`.

Audio frames: while a connection's reader has nothing queued (`queued == 0`), each whole
binary message goes straight to its `on_binary` hook from the protocol callback, which
stores it in the connection's pending queue without a task waking up. Every other message
(text, fragmented, a binary one the hook declines, and all that follow while any of them
is unread) goes through websockets' queue to the reader's `recv`, so the order of audio
and text is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ProtocolError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event, State
from websockets.server import ServerProtocol
from websockets.typing import Data

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
        #: Takes a whole binary message; False: not taken (it then goes to `recv`).
        self.on_binary: Callable[[bytes], bool] | None = None
        #: Data messages begun and handed to websockets' queue, not yet returned by `recv`.
        self.queued = 0
        #: Messages taken by `on_binary` and messages returned by `recv` (for tests).
        self.direct = self.received = 0

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and (
            event.opcode is Opcode.BINARY or event.opcode is Opcode.TEXT
        ):
            hook = self.on_binary
            if (
                hook is not None
                and self.queued == 0
                and event.fin
                and event.opcode is Opcode.BINARY
                and hook(bytes(event.data))
            ):
                self.direct += 1
                return
            self.queued += 1
        super().process_event(event)

    async def recv(self, decode: bool | None = None) -> Data:  # type: ignore[override]
        message = await super().recv(decode)
        self.queued -= 1
        self.received += 1
        return message
