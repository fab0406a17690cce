"""`streamscribe jobs submit FILE` and `streamscribe jobs get JOB_ID`: file jobs from the
command line (shared/jobs_client.py does the work)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from shared.errors import ConfigError
from shared.jobs_client import JobError, get_job, submit_job, wait_job
from shared.transcribe_cli import add_service_arguments, service_of
from shared.wavfile import read_wav


def add_jobs_parser(sub: Any) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="transcribe whole files as jobs, at a lower priority than live sessions",
        description="Upload a WAV file as a file job (`submit`), or read a job's state and "
        "transcript (`get`). File jobs are decoded when live sessions leave the workers "
        "room; the result stays readable for job_ttl_s (default a day). Without --url, "
        "uses the service started by `streamscribe up` on this machine.",
    )
    what = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    submit = what.add_parser(
        "submit",
        help="upload a WAV file as a job; print its ID (and with --wait, its transcript)",
        description="Upload a 16-bit or float WAV file (8-48 kHz, mono or stereo) as one "
        "job and print its ID. With --wait, stay connected and print the transcript when "
        "the job is done (progress on stderr).",
    )
    submit.add_argument("file", help="WAV file to transcribe")
    submit.add_argument("--name", default="", help="a name for the job (default: the file's)")
    submit.add_argument(
        "--language",
        help="language spoken: an ISO 639 code or auto; needs a multilingual model "
        "(default: the service's, en)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the transcript")
    get = what.add_parser(
        "get",
        help="print a job's state, and its transcript once done",
        description="Print a job's state and progress, and its transcript once done. "
        "Exit status: 0 done, 3 waiting or running, 2 failed or unknown.",
    )
    get.add_argument("job_id", help="the ID `jobs submit` printed")
    get.add_argument("--wait", action="store_true", help="poll until the job is finished")
    for p in (submit, get):
        add_service_arguments(p, "the gateway's URL, e.g. wss://host:8765")
        p.add_argument(
            "--json", action="store_true", help="print the job as JSON (segments, words)"
        )


def run_jobs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    url, ctx, api_key = service_of(args)
    try:
        if args.jobs_command == "submit":
            return asyncio.run(_submit(args, url, ctx, api_key, out))
        return asyncio.run(_get(args, url, ctx, api_key, out))
    except JobError as exc:
        sys.stderr.write(f"streamscribe: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"streamscribe: cannot reach {url}: {exc}\n")
        return 2


def _progress(view: dict[str, Any]) -> None:
    where = f", position {view['position']}" if view.get("position") is not None else ""
    sys.stderr.write(
        f"job {view['job_id']}: {view['state']}{where}, "
        f"{view['done_seconds']:.0f} of {view['audio_seconds']:.0f} s transcribed\n"
    )


async def _submit(
    args: argparse.Namespace, url: str, ctx: Any, api_key: str | None, out: TextIO
) -> int:
    from pathlib import Path

    try:
        audio = read_wav(args.file)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    receipt, done = await submit_job(
        url,
        audio.data,
        sample_rate=audio.sample_rate,
        encoding=audio.encoding,
        channels=audio.channels,
        language=args.language,
        name=args.name or Path(args.file).name[:200],
        api_key=api_key,
        ssl_context=ctx,
        wait=args.wait,
        on_progress=_progress,
    )
    if done is None:
        if args.json:
            out.write(json.dumps({"job_id": receipt.job_id, "position": receipt.position}) + "\n")
        else:
            out.write(f"{receipt.job_id}\n")
            sys.stderr.write(
                f"job {receipt.job_id} queued: {receipt.audio_seconds:.1f} s of audio, "
                f"position {receipt.position}. Read it with: streamscribe jobs get "
                f"{receipt.job_id}\n"
            )
        return 0
    _print_job(done, args.json, out)
    return 0


async def _get(
    args: argparse.Namespace, url: str, ctx: Any, api_key: str | None, out: TextIO
) -> int:
    if args.wait:
        view = await wait_job(url, args.job_id, api_key=api_key, ssl_context=ctx)
    else:
        view = await get_job(url, args.job_id, api_key=api_key, ssl_context=ctx)
    _print_job(view, args.json, out)
    if view["state"] == "done":
        return 0
    return 2 if view["state"] == "failed" else 3


def _print_job(view: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(view) + "\n")
        return
    if view["state"] != "done":
        _progress(view)
        if view["state"] == "failed":
            sys.stderr.write(f"job {view['job_id']} failed: {view.get('error', '')}\n")
    for seg in view.get("segments", []):
        out.write(f"[{seg['start']:7.2f} - {seg['end']:7.2f}] {seg['text'].strip()}\n")
    if view["state"] == "done":
        sys.stderr.write(
            f"job {view['job_id']} done: {view['audio_seconds']:.1f} s of audio, "
            f"{len(view.get('segments', []))} segment(s)\n"
        )
