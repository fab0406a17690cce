"""Streaming segmentation of one session, sans I/O: audio in, decode requests out.

`SessionTranscriber` owns one session's audio buffer and VAD state (nothing is shared
between sessions). It cuts the audio into utterances with the streaming Silero VAD:
an utterance opens at the first speech window and ends after `min_silence_s` of
silence, on the client's `finalize`, at the end of the stream, or when it reaches
`max_utterance_s` (cut at the least speech-like window of its last 2 s). It asks for
decodes one at a time (`next_request`): finals of ended utterances first, in order,
then an interim of the open utterance when `interim_interval_s` of new audio has come
(not during a pause of `interim_pause_s` or more: a final may be about to follow). An
interim still outstanding when a final falls due is in the final's way
(`interim_in_the_way`): it is set aside (withdrawn from the scheduler's queue if it has
not started, left to finish if it has) and the final is asked for at once. `complete()`
turns a decode into transcripts with session-relative times.

Each final carries when it fell due (`Final.due_at`): a reading of the injected `clock`
(the worker's `time.monotonic`; none by default) taken as the utterance's end is decided
in `push_audio`, `finalize` or `close`, so the worker can time the final from there to
its publication (`final_seconds` on its /metrics). Nothing here reads the time itself.

Early finals. Waiting for `min_silence_s` of silence before decoding puts that wait and
the decode one after the other in every final's lag. So once the open utterance has been
silent for `early_final_s`, its final is requested at once, on the audio up to then: the
speech plus `speech_pad_s`, but at most the `early_final_s` pause in whole VAD windows.
Every utterance that silence (or a `finalize` in such a pause) ends keeps exactly that
much, so its audio is the same whether or not the early decode was made. If the silence
reaches `min_silence_s`, the utterance ends there and that decode *is* its final: no
second decode, and the final is out as soon as the silence is confirmed (`take_ready`),
or as soon as the decode finishes if it is still running. If speech resumes instead, the
decode is sent as an interim of the utterance, so the work is not lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared.config import Config
from shared.envelope import Transcript, Word
from worker.audio import SampleBuffer
from worker.engine import SAMPLE_RATE, VAD_WINDOW, Audio, Segment
from worker.language import LanguageLock

MIN_SPEECH_S = 0.15  # shorter "utterances" are noise blips: never decoded
CUT_SEARCH_S = 2.0  # where to look for a pause when an utterance must be cut


@dataclass(frozen=True, slots=True)
class StreamOptions:
    vad_threshold: float = 0.5
    min_silence_s: float = 0.5
    speech_pad_s: float = 0.2  # the service default is Config.speech_pad_s
    max_utterance_s: float = 20.0
    interim_interval_s: float = 1.0
    interim_results: bool = True
    # No interim while the open utterance has been silent this long: it would carry no new
    # words, and its decode would hold up the final that this pause may be about to end in.
    # 0: no such rule.
    interim_pause_s: float = 0.2
    # Decode the final ahead once the open utterance has been silent this long (see the
    # module docstring). 0, or not less than min_silence_s: never.
    early_final_s: float = 0.2
    # How much of the session's previous final (its last characters) conditions the next
    # decode as Whisper's prompt; 0: none (the service default is Config.prompt_chars).
    prompt_chars: int = 0
    # The session's language: a code, or None to detect it (`auto`). A detecting session
    # is fixed on one language once `language_lock_s` seconds of its finals' speech give
    # that language `language_lock_share` of the detection weight (worker/language.py);
    # 0: detect every decode.
    language: str | None = "en"
    language_lock_s: float = 0.0
    language_lock_share: float = 0.8

    @classmethod
    def from_config(cls, config: Config, *, interim_results: bool = True) -> StreamOptions:
        """The service's segmentation settings (the worker and the benchmarks use these)."""
        return cls(
            vad_threshold=config.vad_threshold,
            min_silence_s=config.min_silence_s,
            speech_pad_s=config.speech_pad_s,
            max_utterance_s=config.max_utterance_s,
            interim_interval_s=config.interim_interval_s,
            interim_results=interim_results,
            interim_pause_s=config.interim_pause_s,
            early_final_s=config.early_final_s,
            prompt_chars=config.prompt_chars,
            language=None if config.language == "auto" else config.language,
            language_lock_s=config.language_lock_s,
            language_lock_share=config.language_lock_share,
        )


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    kind: Literal["final", "interim"]
    start: int  # session sample index (16 kHz) of audio[0]
    end: int
    audio: Audio
    result_id: int
    prompt: str = ""  # text of the session's previous final (decoder context)
    early: bool = False  # a final asked for before its utterance is known to have ended
    language: str | None = "en"  # None: the decode detects it
    # An interim's: seconds of its utterance's audio since the client last saw text of it
    unseen_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Interim:
    transcript: Transcript


@dataclass(frozen=True, slots=True)
class Final:
    transcript: Transcript | None  # None: the utterance held no words (no result_id used)
    commit_sample: int  # everything before this sample is fully handled
    early: bool = False  # decoded before the utterance's end was confirmed
    # The language this final's detection fixed the session on (see LanguageLock), once.
    locked_language: str | None = None
    # The transcriber's clock when the utterance's end was decided (silence, finalize, end
    # of stream, or a cut at max_utterance_s): its final fell due. However often or early
    # the final was decoded (an early final, a pack's retry), it is timed from here.
    due_at: float = 0.0


Output = Interim | Final
VadFn = Callable[[Audio], "np.ndarray"]
Clock = Callable[[], float]


def no_clock() -> float:
    """The default clock: every final's `due_at` is 0 (tests and benchmarks that do not
    time finals)."""
    return 0.0


class SessionTranscriber:
    def __init__(
        self,
        options: StreamOptions,
        vad: VadFn,
        *,
        start_sample: int = 0,
        finals: int = 0,
        clock: Clock = no_clock,
    ) -> None:
        self.opt = options
        self._vad = vad
        self._clock = clock  # read once per ended utterance, for `Final.due_at`
        self._neg_threshold = max(options.vad_threshold - 0.15, 0.01)
        self._min_silence = int(options.min_silence_s * SAMPLE_RATE)
        self._min_speech = int(MIN_SPEECH_S * SAMPLE_RATE)  # shorter: a blip, never decoded
        self._pad = int(options.speech_pad_s * SAMPLE_RATE)
        self._max_utt = int(options.max_utterance_s * SAMPLE_RATE)
        self._interim_every = int(options.interim_interval_s * SAMPLE_RATE)
        self._interim_pause = int(options.interim_pause_s * SAMPLE_RATE)
        early = int(options.early_final_s * SAMPLE_RATE)
        self._early_after = early if 0 < early < self._min_silence else 0
        # Audio kept after the speech of an utterance that silence ended: speech_pad_s, or
        # with early finals at most the silence the early decode had (whole VAD windows),
        # so a final's audio never depends on whether its early decode was made in time.
        early_tail = -(-self._early_after // VAD_WINDOW) * VAD_WINDOW
        self._tail = min(self._pad, early_tail) if self._early_after else self._pad
        self.finals = finals  # result_id of the next final
        self.committed = start_sample
        self._buf = SampleBuffer(start_sample)
        self._total = start_sample  # samples received (session index of the next one)
        self._vad_pos = start_sample  # next sample the VAD has not judged
        self._utt_start: int | None = None  # open utterance: first speech sample
        self._last_speech_end = 0
        self._utt_probs: deque[tuple[int, float]] = deque()
        self._last_interim_end = 0
        self._shown_end = 0  # end sample of the last interim of this session sent out
        # Ended utterances to finalize: (start, end, clock reading when the end was decided).
        self._pending: deque[tuple[int, int, float]] = deque()
        self._outstanding: DecodeRequest | None = None
        # An interim still decoding that a final went past (`set_interim_aside`).
        self._set_aside: DecodeRequest | None = None
        self._prompt = ""
        self.closing = False
        # Early final of the current pause: the speech end it was asked at, and once
        # decoded, its result (kept until the utterance ends or speech resumes).
        self._early_at: int | None = None
        self._early_done: tuple[DecodeRequest, list[Segment]] | None = None
        self._ready: deque[Output] = deque()  # finals that needed no decode, to publish
        self.language_lock = LanguageLock(options.language_lock_s, options.language_lock_share)
        self.language = options.language  # what the next decode is told (None: detect)

    # --- input ----------------------------------------------------------------------

    @property
    def total_samples(self) -> int:
        return self._total

    def push_audio(self, samples: Audio) -> None:
        if self.closing:
            raise RuntimeError("push_audio after close")
        if samples.size == 0:
            return
        self._buf.append(samples)
        self._total += samples.size
        whole = (self._total - self._vad_pos) // VAD_WINDOW * VAD_WINDOW
        if whole:
            probs = self._vad(self._buf.view(self._vad_pos, self._vad_pos + whole))
            for i, p in enumerate(probs):
                self._judge(self._vad_pos + i * VAD_WINDOW, float(p))
            self._vad_pos += whole
        self._trim()

    def finalize(self, *, end_of_stream: bool = False) -> None:
        """End the open utterance now (client `finalize`, or end of stream).

        In a pause already long enough for an early final, the utterance ends where it
        would have had the silence gone on (so its early decode, if made, is its final):
        the rest is judged silence, plus at most one VAD window not yet judged.

        An utterance with less than MIN_SPEECH_S of speech so far stays open, unless the
        stream ends: ended now it would be a blip, never decoded, and a `finalize` in the
        first moments of a word would lose them (and, the word going on, its rest too:
        one short word cut in two blips). Open, it joins the speech that follows, or
        silence ends it as the blip it is."""
        if self._utt_start is None:
            return
        if not end_of_stream and self._last_speech_end - self._utt_start < self._min_speech:
            return
        paused = self._vad_pos - self._last_speech_end >= self._early_after > 0
        self._end_utterance(self._last_speech_end + self._tail if paused else self._total)

    def close(self, tail: Audio | None = None) -> None:
        """No more audio: finalize what is open; `done` turns true once all is decoded."""
        if tail is not None and tail.size and not self.closing:
            self.push_audio(tail)
        self.finalize(end_of_stream=True)
        self.closing = True

    @property
    def done(self) -> bool:
        return (
            self.closing
            and not self._pending
            and self._outstanding is None
            and self._set_aside is None
            and self._utt_start is None
            and not self._ready
        )

    def take_ready(self) -> list[Output]:
        """Finals that are complete without a decode (an early final whose utterance
        has now ended), in order. Call after feeding audio."""
        out = list(self._ready)
        self._ready.clear()
        return out

    # --- VAD decisions ------------------------------------------------------------------

    def _judge(self, pos: int, prob: float) -> None:
        end = pos + VAD_WINDOW
        if self._utt_start is None:
            if prob >= self.opt.vad_threshold:
                self._utt_start = pos
                self._last_speech_end = end
                self._last_interim_end = pos
                self._utt_probs.clear()
                self._utt_probs.append((pos, prob))
            return
        self._utt_probs.append((pos, prob))
        if prob >= self._neg_threshold:
            self._last_speech_end = end
        elif end - self._last_speech_end >= self._min_silence:
            self._end_utterance(self._last_speech_end + self._tail)
            return
        if end - self._utt_start >= self._max_utt:
            self._cut_long_utterance(end)

    def _cut_long_utterance(self, end: int) -> None:
        assert self._utt_start is not None
        lo = max(end - int(CUT_SEARCH_S * SAMPLE_RATE), self._utt_start + self._max_utt // 2)
        window = [(p, -pos) for pos, p in self._utt_probs if pos >= lo]
        # Least speech-like window; on ties the latest, so pieces stay near the maximum.
        _, neg_cut = min(window) if window else (0.0, -end)
        cut = -neg_cut
        cut = max(cut, self._utt_start or cut) + VAD_WINDOW // 2
        self._end_utterance(min(cut, end), keep_open=True)

    def _end_utterance(self, end: int, *, keep_open: bool = False) -> None:
        assert self._utt_start is not None
        start = self._open_start()
        end = min(end, self._total)
        speech = min(self._last_speech_end, end) - self._utt_start
        early, self._early_done, self._early_at = self._early_done, None, None
        if speech >= self._min_speech and end > start:
            if (
                early is not None
                and not self._pending
                and (self._outstanding is None or self._outstanding.kind == "interim")
                and _same_final(early[0], start, end, self.finals, self._prompt)
            ):
                self._ready.append(self._finish(*early, due_at=self._clock()))
            else:
                self._pending.append((start, end, self._clock()))
        elif not self._pending and self._outstanding is None:
            self.committed = max(self.committed, end)  # a blip: nothing to wait for
        if keep_open:
            self._utt_start = end
            self._last_interim_end = end
            self._utt_probs = deque((pos, p) for pos, p in self._utt_probs if pos >= end)
        else:
            self._utt_start = None
            self._utt_probs.clear()

    # --- decoding -----------------------------------------------------------------------

    def next_request(self) -> DecodeRequest | None:
        """The next decode to run for this session, if any (one at a time)."""
        if self._outstanding is not None:
            return None
        if self._pending:
            start, end, _ = self._pending[0]
            req = self._request("final", start, end)
        elif self._early_due():
            assert self._utt_start is not None
            end = self._last_speech_end + self._tail  # judged already: <= self._vad_pos
            self._early_at = self._last_speech_end
            self._last_interim_end = self._vad_pos
            req = self._request("final", self._open_start(), end, early=True)
        elif self._interim_due():
            start = self._open_start()
            self._last_interim_end = self._vad_pos
            unseen = (self._vad_pos - max(start, self._shown_end)) / SAMPLE_RATE
            req = self._request("interim", start, self._vad_pos, unseen_s=unseen)
        else:
            return None
        self._outstanding = req
        return req

    def _request(
        self,
        kind: Literal["final", "interim"],
        start: int,
        end: int,
        *,
        early: bool = False,
        unseen_s: float = 0.0,
    ) -> DecodeRequest:
        """A decode of [start, end) with the session's next result_id, prompt and language."""
        return DecodeRequest(
            kind,
            start,
            end,
            self._slice(start, end),
            self.finals,
            self._prompt,
            early=early,
            language=self.language,
            unseen_s=unseen_s,
        )

    def has_work(self) -> bool:
        """Whether the session's task has anything to do now: finals ready to publish,
        the stream done, a decode that `next_request` would start, or an interim in the
        way of a final (`interim_in_the_way`). False means that none of these holds, so
        the task need not be woken for the audio just fed."""
        if self._ready or self.done:
            return True
        if self._outstanding is not None:
            return self.interim_in_the_way()
        return bool(self._pending) or self._early_due() or self._interim_due()

    def interim_in_the_way(self) -> bool:
        """Whether the decode outstanding is an interim while a final is due (an ended
        utterance's, or an early one in a pause). The session asks for one decode at a
        time, so until that interim is done its final would not even be asked for: the
        worker sets it aside (`set_interim_aside`) and asks for the final at once."""
        req = self._outstanding
        return (
            req is not None
            and req.kind == "interim"
            and self._set_aside is None
            and (bool(self._pending) or self._early_due())
        )

    def set_interim_aside(self) -> DecodeRequest:
        """Stop waiting for the outstanding interim (`interim_in_the_way`) and return it:
        `next_request` goes on to the final. The worker withdraws it from the scheduler's
        queue if it has not started (answered None: `abandon_request`); one already in
        the engine finishes on its own, and `complete` sends it as an interim if its
        utterance is still open and no newer interim has been sent. At most one is set
        aside at a time, and the stream is not `done` until it is back."""
        req = self._outstanding
        assert req is not None and req.kind == "interim" and self._set_aside is None
        self._outstanding, self._set_aside = None, req
        return req

    def _interim_due(self) -> bool:
        """Whether the open utterance is due an interim decode (and not in a pause)."""
        return (
            self.opt.interim_results
            and self._utt_start is not None
            and self._vad_pos - self._last_interim_end >= self._interim_every
            and not (0 < self._interim_pause <= self._vad_pos - self._last_speech_end)
        )

    def complete(self, req: DecodeRequest, segments: list[Segment]) -> list[Output]:
        """Results of a decode started by `next_request`."""
        if req is self._set_aside:
            self._set_aside = None
            if req.end <= self._shown_end:  # newer text is on screen (the early decode's)
                return []
            return self._interim(req, segments)
        if req is not self._outstanding:
            raise RuntimeError("complete() for a request this session is not waiting for")
        self._outstanding = None
        if req.early and not (
            self._pending
            and self._pending[0][:2] == (req.start, req.end)
            and _same_final(req, req.start, req.end, self.finals, self._prompt)
        ):
            return self._early_result(req, segments)
        if req.kind == "interim":
            return self._interim(req, segments)
        _, _, due_at = self._pending.popleft()
        return [self._finish(req, segments, due_at)]

    def _early_result(self, req: DecodeRequest, segments: list[Segment]) -> list[Output]:
        """An early final decoded before its utterance ended: kept in case it ends right
        there, and sent as an interim meanwhile (discarded if the utterance ended
        somewhere else)."""
        if self._pending or self._utt_start is None or req.result_id != self.finals:
            return []
        if self._early_at == self._last_speech_end:
            self._early_done = (req, segments)  # no new speech since it was asked for
        return self._interim(req, segments) if self.opt.interim_results else []

    def _interim(self, req: DecodeRequest, segments: list[Segment]) -> list[Output]:
        text = " ".join(s.text for s in segments).strip()
        if not text or self._utt_start is None or req.result_id != self.finals:
            return []
        offset = req.start / SAMPLE_RATE
        self._shown_end = max(self._shown_end, req.end)
        return [Interim(_transcript(req.result_id, False, offset, req, segments, text))]

    def _finish(self, req: DecodeRequest, segments: list[Segment], due_at: float) -> Final:
        """The final of the utterance `req` covers (already taken off `_pending`), which
        fell due at `due_at`."""
        self.committed = max(self.committed, req.end)
        self._trim()
        text = " ".join(s.text for s in segments).strip()
        if not text:
            return Final(None, self.committed, req.early, due_at=due_at)
        transcript = _transcript(self.finals, True, req.start / SAMPLE_RATE, req, segments, text)
        self.finals += 1
        self._prompt = prompt_of(text, self.opt.prompt_chars)
        locked = None
        if self.language is None and segments[0].languages:
            locked = self.language_lock.observe(
                segments[0].languages, (req.end - req.start) / SAMPLE_RATE
            )
            if locked is not None:
                self.language = locked
        return Final(transcript, self.committed, req.early, locked, due_at)

    def _early_due(self) -> bool:
        """Whether the open utterance's pause is long enough to decode its final early."""
        return (
            self._early_after > 0
            and self._utt_start is not None
            and not self._pending
            and self._early_at != self._last_speech_end
            and self._vad_pos - self._last_speech_end >= self._early_after
            and self._last_speech_end - self._utt_start >= self._min_speech
        )

    def _open_start(self) -> int:
        """Where the open utterance's audio starts (its final's and its interims')."""
        assert self._utt_start is not None
        floor = max(self.committed, self._pending[-1][1] if self._pending else self.committed)
        return max(self._utt_start - self._pad, floor, self._buf.start)

    def abandon_request(self, req: DecodeRequest) -> None:
        """A decode failed or was dropped: an interim is simply skipped; a final retried."""
        if req is self._outstanding:
            self._outstanding = None
        elif req is self._set_aside:
            self._set_aside = None

    # --- buffer ----------------------------------------------------------------------

    def _slice(self, start: int, end: int) -> Audio:
        """A decode's audio: a view, which later feeding never changes (`SampleBuffer`).
        Copying the open utterance for every interim was a fifth of a null-engine
        worker's event loop (1,000 sessions)."""
        return self._buf.view(start, end)

    def _trim(self) -> None:
        keep = self._vad_pos - self._pad
        if self._utt_start is not None:
            keep = min(keep, self._utt_start - self._pad)
        if self._pending:
            keep = min(keep, self._pending[0][0])
        for req in (self._outstanding, self._set_aside):
            if req is not None:
                keep = min(keep, req.start)
        self._buf.drop_before(keep)


def prompt_of(final_text: str, chars: int) -> str:
    """The prompt a final's text gives the session's next decode: its last `chars`
    characters (none for 0)."""
    return final_text[-chars:] if chars > 0 else ""


def _same_final(req: DecodeRequest, start: int, end: int, result_id: int, prompt: str) -> bool:
    """Whether `req` decoded exactly the final that is now due (same audio and context)."""
    return (req.start, req.end, req.result_id, req.prompt) == (start, end, result_id, prompt)


def _transcript(
    result_id: int,
    final: bool,
    offset: float,
    req: DecodeRequest,
    segments: list[Segment],
    text: str,
) -> Transcript:
    limit = req.end / 16000
    words = tuple(
        Word(
            w.word,
            round(min(offset + w.start, limit), 3),
            round(min(offset + w.end, limit), 3),
            w.probability,
        )
        for s in segments
        for w in s.words
    )
    start = offset + segments[0].start
    end = min(offset + segments[-1].end, limit)
    return Transcript(result_id, final, round(start, 3), round(max(start, end), 3), text, words)
