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

Framing: once the connection is open, incoming bytes are cut into whole frames here
(`frame_bounds`), and a frame that is a whole masked binary message within the size
limit, with no extension and no fragmented message in progress, is unmasked and handed to
`on_binary` without websockets' generator-based parser (which was a seventh of the
gateway's CPU at a frame per session every 100 ms). Every other frame (text, control,
fragments, too large, unmasked, reserved bits, or one the hook declines) is fed to
websockets as a whole frame, which parses, checks and answers it as it always does.
Framing starts here only if websockets' parser is at a frame boundary when the connection
opens (`parser_at_boundary`); from then on websockets only ever gets whole frames, so it
stays at one. A partial frame waits here for the rest of its bytes.

Reading: the transport (for TLS, the event loop's SSL layer, decrypting) reads straight
into the connection's own small buffer (`get_buffer`, `buffer_updated`), which holds the
partial frame between reads. For that the transport's protocol is a `BufferedReads`,
set in `connection_made`: uvloop, which the gateway runs on, reads into a protocol's
buffer only when that protocol is not an `asyncio.Protocol`, and websockets' connection
is one. Read by `data_received` instead, every TLS read went through a 256 KiB block that
the SSL layer allocates per read (gateway/memory.py), and every frame through
websockets' parser. A transport that still calls `data_received` has its bytes copied
into the same buffer, so the framing is the same either way.
"""

from __future__ import annotations

import asyncio
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
from shared.wsframes import frame_bounds, frame_limit, framing_state

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask
from shared.protocol import build_server_message, error_message


def too_large_text(limit: int | None, reason: str) -> str:
    """The `error` message sent before websockets' own 1009."""
    where = f"max_frame_bytes ({limit} bytes)" if limit is not None else "the gateway's limit"
    return build_server_message(
        error_message(FrameTooLarge(f"message larger than {where}: {reason}"))
    )


#: First header byte of a whole binary message: FIN, no reserved bits, opcode 2.
_FIN_BINARY = 0x82
#: A connection's read buffer (allocated with it, so kept small): two 100 ms audio frames
#: (3.2 KB of 16 kHz PCM each); a larger frame grows it while it arrives, and a burst
#: is read in several turns.
READ_BUFFER_BYTES = 8 * 1024
#: The least free space a read is offered (the buffer grows to keep it).
MIN_READ_BYTES = 2 * 1024


class BufferedReads(asyncio.BufferedProtocol):
    """The transport's protocol for a `GatewayServerConnection`: its reads, end and flow
    control go to the connection. A `BufferedProtocol` that is not an `asyncio.Protocol`,
    which uvloop's transports (TCP and SSL) need before they read into `get_buffer`; the
    standard loop's take either."""

    __slots__ = ("conn",)

    def __init__(self, conn: GatewayServerConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # the connection was told, before it handed the transport over

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)

    def eof_received(self) -> None:
        self.conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        # The transport keeps its protocol, and the connection its transport: a reference
        # back would hold every closed connection (its SSL objects, buffers) in a cycle
        # until the collector's next full pass, which the gateway makes rare (tune_gc).
        del self.conn
        conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


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
        self._declined = False  # the frame being fed to websockets was offered already
        #: Data messages begun and handed to websockets' queue, not yet returned by `recv`.
        self.queued = 0
        #: Messages taken by `on_binary` and messages returned by `recv` (for tests).
        self.direct = self.received = 0
        #: Framing here (see the module's doc): None until the connection is open.
        self._framing: bool | None = None
        #: Where the transport reads into (see `get_buffer`): the first `_filled` bytes
        #: are the start of a frame whose end has not arrived yet.
        self._buf = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._filled = 0
        #: Frames this framing fed to websockets whole (for tests).
        self.slow_frames = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # From now on the transport reads into `get_buffer` (see the module's doc).
        with contextlib.suppress(NotImplementedError):
            transport.set_protocol(BufferedReads(self))

    def data_received(self, data: bytes) -> None:
        """Bytes from a transport that does not read into `get_buffer`: copied into the
        read buffer, then framed as if read there."""
        view, pos = memoryview(data), 0
        while pos < len(view):
            buf = self.get_buffer(len(view) - pos)
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
            self.buffer_updated(n)

    def get_buffer(self, sizehint: int) -> memoryview:
        """The free part of the read buffer, after the partial frame kept from the last
        read. A frame larger than the buffer makes it grow (a new buffer: the transport
        may still hold a view of the old one); it shrinks back once that frame is in."""
        free = len(self._buf) - self._filled
        if free < MIN_READ_BYTES:
            bigger = bytearray(max(2 * len(self._buf), self._filled + MIN_READ_BYTES))
            bigger[: self._filled] = self._view[: self._filled]
            self._buf, self._view = bigger, memoryview(bigger)
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        end = self._filled + nbytes
        framing = self._framing
        if framing is None:
            framing = self._framing = framing_state(self.protocol)
        if not framing:
            # The handshake, or websockets keeps the framing: it gets the bytes.
            data = bytes(self._view[:end])
            self._filled = 0
            super().data_received(data)
            return
        with self._view[:end] as view:
            pos = self._frames(view)
        if pos < 0:  # framing stopped: websockets has the rest
            self._filled = 0
            return
        tail = end - pos
        if tail and pos:
            # Copied out first: the two ranges may overlap. Same length: no resize (the
            # buffer may be exported).
            self._buf[:tail] = self._view[pos:end].tobytes()
        self._filled = tail
        if len(self._buf) > READ_BUFFER_BYTES and tail <= READ_BUFFER_BYTES // 2:
            smaller = bytearray(READ_BUFFER_BYTES)  # the large frame is in: shrink back
            smaller[:tail] = self._view[:tail]
            self._buf, self._view = smaller, memoryview(smaller)

    def _frames(self, view: memoryview) -> int:
        """Take or feed every whole frame in `view`; where the first incomplete one
        starts, or -1 if framing stopped and websockets was given everything."""
        protocol = self.protocol
        limit = frame_limit(protocol)
        pos, size = 0, len(view)
        while pos < size:
            bounds = frame_bounds(view, pos)
            if bounds is None:
                break
            start, end = bounds
            if limit is not None and end - start > limit:
                # websockets refuses it at its header, before its payload arrives.
                self._framing = False
                super().data_received(bytes(view[pos:]))
                return -1
            if end > size:
                break
            hook = self.on_binary
            if (
                hook is not None
                and self.queued == 0
                and view[pos] == _FIN_BINARY
                and view[pos + 1] & 0x80  # masked, as a client's frames must be
                and protocol.state is State.OPEN
                and protocol.current_size is None  # no fragmented message in progress
                and hook(apply_mask(view[start:end], bytes(view[start - 4 : start])))
            ):
                self.direct += 1
            else:
                self.slow_frames += 1
                self._declined = True  # process_event must not offer it to the hook again
                try:
                    super().data_received(bytes(view[pos:end]))
                finally:
                    self._declined = False
            pos = end
        return pos

    def eof_received(self) -> None:
        if self._filled:
            rest = bytes(self._view[: self._filled])
            self._filled = 0
            super().data_received(rest)  # websockets ends it as a truncated frame
        return super().eof_received()

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and (
            event.opcode is Opcode.BINARY or event.opcode is Opcode.TEXT
        ):
            hook = self.on_binary
            if (
                hook is not None
                and not self._declined
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
