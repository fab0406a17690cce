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
into a buffer (`get_buffer`, `buffer_updated`). For that the transport's protocol is a
`BufferedReads`, set in `connection_made`: uvloop, which the gateway runs on, reads into a
protocol's buffer only when that protocol is not an `asyncio.Protocol`, and websockets'
connection is one. Read by `data_received` instead, every TLS read went through a 256 KiB
block that the SSL layer allocates per read (gateway/memory.py), and every frame through
websockets' parser. A transport that still calls `data_received` has its bytes copied
into the same buffers, so the framing is the same either way.

The buffer: a connection that holds no partial frame reads into its thread's
`ReadScratch`, one buffer that every connection of the event loop borrows for one read
at a time (the loops call `get_buffer` and `buffer_updated` back to back; a read that
brings nothing leaves it to the next). Only the start of a frame whose end has not
arrived is copied into a buffer of the connection's own, which the next reads fill and
which is dropped once that frame is whole. An idle connection, or one whose frames
arrive whole, holds no read buffer at all (8 KiB each before session 25).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
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
#: The read buffer every connection of one event loop borrows, a read at a time: a
#: burst of many frames is read in one turn.
SCRATCH_BYTES = 64 * 1024
#: A connection's own buffer, held only while a frame is partly read: two 100 ms audio
#: frames (3.2 KB of 16 kHz PCM each); a larger frame grows it while it arrives.
READ_BUFFER_BYTES = 8 * 1024
#: The least free space a read into a connection's own buffer is offered (it grows to
#: keep it).
MIN_READ_BYTES = 2 * 1024


class ReadScratch:
    """The read buffer that the connections of one event loop (one thread) take turns
    at: lent by `get_buffer` to a connection with no partial frame, given back by the
    `buffer_updated` that follows. Not lent while a read in it is being framed, so a read
    that framing sets off (a transport closing reads what it still holds) goes to the
    connection's own buffer instead of over the bytes being framed."""

    __slots__ = ("busy", "owner", "view")

    def __init__(self, nbytes: int = SCRATCH_BYTES, *, lend: bool = True) -> None:
        self.view = memoryview(bytearray(nbytes))
        #: The connection the last `get_buffer` lent it to, until its `buffer_updated`.
        self.owner: GatewayServerConnection | None = None
        #: A read in it is being framed, or (`lend` False) it is never lent.
        self.busy = not lend


_threads = threading.local()


def thread_scratch() -> ReadScratch:
    """This thread's `ReadScratch` (one event loop runs per thread). On Windows it is
    never lent: the proactor loop asks for a buffer when it starts a read and reports
    the read when it completes, with other connections' reads in between."""
    scratch: ReadScratch | None = getattr(_threads, "scratch", None)
    if scratch is None:
        scratch = _threads.scratch = ReadScratch(lend=sys.platform != "win32")
    return scratch


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
        #: Where reads go (see `get_buffer`): the loop's scratch, or while a frame is
        #: partly read, the connection's own buffer, whose first `_filled` bytes are
        #: that frame's start.
        self._scratch = thread_scratch()
        self._buf: bytearray | None = None
        self._view = memoryview(b"")
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
        """Where the next read goes: the loop's scratch if this connection holds no
        partial frame (and the scratch is not being framed), else the free part of the
        connection's own buffer, after the partial frame. A frame larger than that buffer
        makes it grow (a new buffer: the transport may still hold a view of the old
        one)."""
        scratch = self._scratch
        if not self._filled and not scratch.busy:
            if self._buf is not None:  # kept for a read that never came
                self._drop_own()
            scratch.owner = self
            return scratch.view
        if scratch.owner is self:
            scratch.owner = None  # this read goes elsewhere; so does its update
        if self._buf is None:
            self._buf = bytearray(READ_BUFFER_BYTES)
            self._view = memoryview(self._buf)
        elif len(self._buf) - self._filled < MIN_READ_BYTES:
            bigger = bytearray(max(2 * len(self._buf), self._filled + MIN_READ_BYTES))
            bigger[: self._filled] = self._view[: self._filled]
            self._buf, self._view = bigger, memoryview(bigger)
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        scratch = self._scratch
        if scratch.owner is self:  # read into the scratch
            scratch.owner = None
            scratch.busy = True
            try:
                self._read(scratch.view, nbytes)
            finally:
                scratch.busy = False
        elif self._buf is not None:
            self._read(self._view, self._filled + nbytes)
        else:  # only a loop that does not read back to back: the bytes are gone
            raise RuntimeError("read into the scratch buffer after it was lent to another")

    def _read(self, buf: memoryview, end: int) -> None:
        """Frame the first `end` bytes of `buf` (the scratch, or the own buffer with the
        partial frame at its start); keep what starts an incomplete frame in the
        connection's own buffer."""
        framing = self._framing
        if framing is None:
            framing = self._framing = framing_state(self.protocol)
        if not framing:
            # The handshake, or websockets keeps the framing: it gets the bytes.
            data = bytes(buf[:end])
            self._drop_own()
            super().data_received(data)
            return
        with buf[:end] as view:
            pos = self._frames(view)
        if pos < 0:  # framing stopped: websockets has the rest
            self._drop_own()
            return
        tail = end - pos
        if not tail:
            self._drop_own()
        elif buf is not self._view:  # from the scratch: the frame's start to keep
            own = bytearray(max(READ_BUFFER_BYTES, tail + MIN_READ_BYTES))
            own[:tail] = buf[pos:end]
            self._buf, self._view, self._filled = own, memoryview(own), tail
        else:
            if pos:
                # Copied out first: the two ranges may overlap. Same length: no resize
                # (the buffer may be exported).
                self._view[:tail] = buf[pos:end].tobytes()
            self._filled = tail

    def _drop_own(self) -> None:
        """No partial frame is held: the connection's own buffer goes."""
        self._filled = 0
        self._buf = None
        self._view = memoryview(b"")

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
            self._drop_own()
            super().data_received(rest)  # websockets ends it as a truncated frame
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._scratch.owner is self:  # a read that failed after `get_buffer`
            self._scratch.owner = None
        self._drop_own()
        super().connection_lost(exc)

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
