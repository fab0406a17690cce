"""`streamscribe transcribe FILE.wav`: stream a file through the service, print results."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import TextIO

from shared.client import SessionError, StreamingSession
from shared.config import client_api_key
from shared.envelope import Closed, Transcript
from shared.errors import ConfigError
from shared.wavfile import read_wav


def add_service_arguments(parser: argparse.ArgumentParser, url_help: str) -> None:
    """The flags that say which service a client command talks to, and how: `--url`,
    `--insecure`, `--cafile`, `--api-key`, `--state-dir` (see `service_of`)."""
    parser.add_argument("--url", help=url_help)
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the server's TLS certificate"
    )
    parser.add_argument("--cafile", help="trust this CA/certificate file (PEM)")
    parser.add_argument("--api-key", help="API key (default: $STREAMSCRIBE_API_KEY)")
    parser.add_argument("--state-dir", default=None, help="where `up` wrote up.json")


def service_of(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | None, str | None]:
    """The URL, TLS context and API key those flags give: without --url, the running
    `streamscribe up` on this machine (and its development certificate)."""
    from shared.cli import find_up

    url, cafile = args.url, args.cafile
    if url is None:
        info = find_up(args.state_dir)
        url = info["url"]
        cafile = cafile or info.get("cafile")
    return url, _ssl_context(url, args.insecure, cafile), args.api_key or client_api_key()


def _ssl_context(url: str, insecure: bool, cafile: str | None) -> ssl.SSLContext | None:
    if not url.startswith("wss:"):
        return None
    ctx = ssl.create_default_context(cafile=cafile)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def stream_file(
    args: argparse.Namespace, url: str, ctx: ssl.SSLContext | None, api_key: str | None, out: TextIO
) -> int:
    audio = read_wav(args.file)
    frames = audio.frames(args.frame_ms)
    tty = out.isatty() and not args.json
    async with StreamingSession(
        url,
        sample_rate=audio.sample_rate,
        encoding=audio.encoding,
        channels=audio.channels,
        interim_results=not args.no_interim,
        language=args.language,
        api_key=api_key,
        ssl_context=ctx,
    ) as session:

        async def send() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i, frame in enumerate(frames):
                if args.realtime:
                    await asyncio.sleep(max(0.0, started + i * args.frame_ms / 1000 - loop.time()))
                await session.send_audio(frame)
            await session.close_stream()

        sender = asyncio.create_task(send())
        try:
            async for result in session.results():
                if args.json:
                    out.write(json.dumps(_as_dict(result)) + "\n")
                elif isinstance(result, Transcript) and not result.is_final:
                    if tty:
                        out.write("\r\x1b[2K" + f"... {result.text}"[-200:])
                elif isinstance(result, Transcript):
                    prefix = "\r\x1b[2K" if tty else ""
                    out.write(f"{prefix}[{result.start:7.2f} - {result.end:7.2f}] {result.text}\n")
                elif isinstance(result, Closed):
                    sys.stderr.write(
                        f"session closed ({result.reason}): {result.audio_seconds:.1f}s audio, "
                        f"{result.final_results} final result(s)\n"
                    )
                out.flush()
        finally:
            sender.cancel()
    return 0


def _as_dict(result: Transcript | Closed) -> dict[str, object]:
    if isinstance(result, Closed):
        return {
            "type": "session.closed",
            "reason": result.reason,
            "audio_seconds": result.audio_seconds,
            "final_results": result.final_results,
        }
    return {
        "type": "transcript",
        "result_id": result.result_id,
        "is_final": result.is_final,
        "start": result.start,
        "end": result.end,
        "text": result.text,
    }


def transcribe_command(args: argparse.Namespace) -> int:
    url, ctx, api_key = service_of(args)
    try:
        read_wav(args.file)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    try:
        return asyncio.run(stream_file(args, url, ctx, api_key, sys.stdout))
    except SessionError as exc:
        sys.stderr.write(f"streamscribe: {exc}\n")
        if exc.closed is not None:  # after a 4429: what the service kept was transcribed
            sys.stderr.write(
                f"streamscribe: the service kept {exc.closed.audio_seconds:.1f}s of audio "
                f"before that; its {exc.closed.final_results} final result(s) are above\n"
            )
        return 2
    except OSError as exc:
        sys.stderr.write(f"streamscribe: cannot reach {url}: {exc}\n")
        return 2
