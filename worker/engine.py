"""The ASR engine and the VAD model, behind our own types.

This is the only module that imports faster-whisper. It turns its segments into
`Segment`/`envelope.Word` values and wraps its Silero VAD model for streaming use.
faster-whisper's `transcribe()` is lazy: the decoding happens while its segments are
iterated, so `transcribe` below iterates them completely before it returns — it is
called in a worker thread, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from shared.envelope import Word
from worker.language import TOP_LANGUAGES
from worker.models import resolve_model

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
VAD_WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
_VAD_CONTEXT = 64

Audio = npt.NDArray[np.float32]

# We decode one VAD-bounded utterance (at most 28 s, so one window) per call. When Whisper
# ends its first segment before the window does, it decodes what is left: the silent pad
# after the last word. A low-confidence guess there used to trigger faster-whisper's
# temperature fallback, up to five more decodes (measured: 2.6-3.7 s instead of 0.5 s for
# a 1.25 s utterance, stalling every session behind it) that still ended in an invented
# word. So: temperature 0 only, and a segment after the first whose average log-probability
# is below faster-whisper's own "failed decode" threshold (-1.0) is dropped. On the 34 real
# clips (../shared/audio/real, streamed) this changed no word of any final.
TRAILING_SEGMENT_MIN_LOGPROB = -1.0
# A segment whose text compresses better than this is a decoding loop (". . . . ." or one
# phrase over and over): faster-whisper's own threshold for a failed decode. A window
# shorter than 30 s makes such loops after the last word more likely (seen on a test
# fixture at 15 s: the last sentence, then 400 confident dots), so a call whose decode
# loops is decoded again over the full window; a looping segment after the first is
# dropped like a low-confidence one.
COMPRESSION_RATIO_MAX = 2.4
# Whisper's classic tail hallucination ("Thank you.", "Okay.", a lone ".") after the last
# word comes from faster-whisper decoding the rest of the window again after the first
# segment: that pass sees mostly padding, so the model itself rates it likely non-speech.
# Measured on the 34 real clips streamed (tiny.en, 15 s window): every such segment had
# no_speech_prob 0.37-0.90 and avg_logprob -0.73 to -1.50; every real later segment had
# no_speech_prob <= 0.10 and avg_logprob >= -0.45. A later segment at or over both
# thresholds below is dropped (Whisper's own rule, 0.6 and -1.0, is for whole windows).
TRAILING_SEGMENT_NO_SPEECH = 0.3
TRAILING_SEGMENT_NO_SPEECH_LOGPROB = -0.5
# A loop runs until Whisper's 448-token limit: on the fixture that loops after its last
# word, ~400 dots, about 1 s of decoding for 2.4 s of audio, which then gets dropped. A
# call on short audio may generate at most MAX_TOKENS_BASE + MAX_TOKENS_PER_S tokens per
# second of it: several times what speech needs (English runs at 3-5 tokens a second,
# timestamps included; digits and CJK text at most ~15), so only a loop ever reaches it.
# At or above SAFE_NEW_TOKENS no cap is passed: faster-whisper keeps up to 223 prompt
# tokens and refuses a prompt + cap over 448, so a larger cap could fail a call with a
# long prompt; such long audio keeps faster-whisper's own limit.
MAX_TOKENS_PER_S = 20
MAX_TOKENS_BASE = 20
SAFE_NEW_TOKENS = 220


@dataclass(frozen=True, slots=True)
class Segment:
    start: float  # seconds from the start of the decoded audio
    end: float
    text: str
    words: tuple[Word, ...]
    # The languages the decode detected, most probable first, with their probabilities
    # (at most TOP_LANGUAGES); empty when the decode was told its language.
    languages: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class RawWord:
    """A word of the packed decode, as the engine reports it (times in window seconds)."""

    text: str  # with Whisper's own leading space
    start: float
    end: float
    probability: float
    segment: int  # index of the engine segment it came from
    reliable: bool = True  # False: its segment is below the engine's confidence floor


class Engine(Protocol):
    name: str

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]: ...

    #: Whether `transcribe_words` may be given several sessions' utterances in one window.
    can_pack: bool

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]: ...


class BatchEngine(Engine, Protocol):
    """An engine that decodes several requests in one call, one window each."""

    can_batch: bool

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[list[Segment]]: ...


def batch_engine(engine: Engine) -> BatchEngine | None:
    """`engine` where it says it can batch (`can_batch`), else None."""
    return cast(BatchEngine, engine) if getattr(engine, "can_batch", False) else None


# The encoder window. faster-whisper pads every call's features to Whisper's 30 s (3000
# frames), and the encoder's cost grows faster than linearly with its input: measured on
# the 2-core VM (tiny.en int8), 0.31 s for 3000 frames, 0.074 s for 1500, 0.044 s for 1000.
# CTranslate2 encodes any length, so a call may encode only `encode_frames(...)` frames:
# the audio, ENCODE_MARGIN_FRAMES more, rounded up to ENCODE_STEP_FRAMES, never less than
# the configured minimum (Whisper was trained on 30 s windows; below ~10 s it starts to
# loop and invent text, see docs/benchmarks.md "Encoder window").
FULL_WINDOW_FRAMES = 3000  # 30 s at 100 mel frames per second
ENCODE_MARGIN_FRAMES = 100
ENCODE_STEP_FRAMES = 100
FRAMES_PER_SECOND = 100
FRAME_SAMPLES = SAMPLE_RATE // FRAMES_PER_SECOND
BATCH_GAP = FRAME_SAMPLES  # zeros after each request of a batched call, at least


def max_new_tokens(samples: int) -> int | None:
    """The most tokens one decoding pass over `samples` of audio may generate (None:
    faster-whisper's own limit)."""
    cap = MAX_TOKENS_BASE + -(-MAX_TOKENS_PER_S * samples // SAMPLE_RATE)
    return cap if cap < SAFE_NEW_TOKENS else None


def encode_frames(samples: int, min_s: float) -> int:
    """Mel frames to encode for `samples` of audio (at most a full 30 s window)."""
    content = samples // (SAMPLE_RATE // FRAMES_PER_SECOND) + 1
    want = -(-(content + ENCODE_MARGIN_FRAMES) // ENCODE_STEP_FRAMES) * ENCODE_STEP_FRAMES
    return min(FULL_WINDOW_FRAMES, max(want, round(min_s * FRAMES_PER_SECOND)))


class WhisperEngine:
    """One faster-whisper model instance, shared by every session of the worker."""

    def __init__(
        self,
        model: str,
        device: str,
        compute_type: str,
        cpu_threads: int,
        encode_min_s: float = 30.0,
        workers: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        path = resolve_model(model, cache_dir)
        if compute_type == "default":
            compute_type = "default" if device != "cpu" else "int8"
        started = time.monotonic()
        self._model = _windowed_model_class()(
            path,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=workers,  # decodes that may run at once, one per calling thread
        )
        self.encode_min_s = encode_min_s
        self.workers = workers
        self.window_retries = 0  # calls decoded again over the full window (a loop)
        self.name = model
        # A multilingual model would detect one language per window: packing sessions of
        # different or undetected languages together is never right, so only .en packs.
        self.can_pack = not bool(self._model.model.is_multilingual)
        self.multilingual = bool(self._model.model.is_multilingual)
        # Batching stacks separate windows (one per request): nothing of one request is in
        # another's window, so any model may batch; requests must share language and prompt.
        self.can_batch = True
        self.batched_calls = 0
        log.info(
            "model %s loaded from %s on %s (%s) in %.1fs",
            model,
            path,
            device,
            compute_type,
            time.monotonic() - started,
        )

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        segments, detected = self._segments(audio, language, beam_size, word_timestamps, prompt)
        kept = _kept(segments)
        if detected:
            kept = [dataclasses.replace(seg, languages=detected) for seg in kept]
        return kept

    @property
    def encodes_saved(self) -> int:
        """Decodes that detected their language and reused the detection's encoder pass."""
        return int(self._model.encodes_saved)

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[list[Segment]]:
        """`transcribe` of several requests in one batched model call: one window per
        request, stacked (faster-whisper's `BatchedInferencePipeline` over clips laid end to
        end; each clip gets its own features, so no request's window holds another's
        audio). All windows are encoded over the longest request's `encode_frames`. A
        request whose decode loops where there may be speech is decoded again alone (as
        `transcribe` would), so batching never keeps a result `transcribe` would not. A
        multilingual model asked to detect the language decodes each request alone."""
        alone = functools.partial(
            self.transcribe,
            language=language,
            word_timestamps=word_timestamps,
            beam_size=beam_size,
            prompt=prompt,
        )
        if len(audios) <= 1 or (self.multilingual and language is None):
            # Alone: one request, or languages to detect (the batched pipeline would
            # detect one language over every request's audio together).
            return [alone(a) for a in audios]
        if not self.multilingual:
            language = "en"
        # Requests laid end to end, each starting on a whole mel frame with at least
        # BATCH_GAP zeros before the next: faster-whisper turns clip times back into
        # samples with int(), and a sample lost to rounding then falls in the gap, never
        # in another request's clip. Each segment says which clip it is from by `seek`.
        starts: list[int] = []
        parts: list[Audio] = []
        pos = 0
        for a in audios:
            starts.append(pos)
            pos += len(a)
            pad = BATCH_GAP + (-(pos + BATCH_GAP)) % FRAME_SAMPLES
            parts += [np.asarray(a, dtype=np.float32), np.zeros(pad, np.float32)]
            pos += pad
        clips = [
            {"start": st / SAMPLE_RATE, "end": (st + len(a)) / SAMPLE_RATE}
            for st, a in zip(starts, audios, strict=True)
        ]
        # What faster-whisper makes of each clip's start: its samples, offset and seek.
        fw_starts = [int(c["start"] * SAMPLE_RATE) for c in clips]
        seek_of = {int(fs / SAMPLE_RATE * FRAMES_PER_SECOND): i for i, fs in enumerate(fw_starts)}
        caps = [max_new_tokens(len(a)) for a in audios]
        self._model.encode_frames = max(encode_frames(len(a), self.encode_min_s) for a in audios)
        segments, _info = _batched_pipeline(self._model).transcribe(
            np.concatenate(parts),
            language=language,
            beam_size=beam_size,
            word_timestamps=word_timestamps,
            without_timestamps=not word_timestamps,
            vad_filter=False,
            clip_timestamps=clips,
            batch_size=len(audios),
            condition_on_previous_text=False,
            initial_prompt=prompt or None,
            temperature=0.0,
            max_new_tokens=None if None in caps else max(c for c in caps if c is not None),
        )
        per: list[list[Any]] = [[] for _ in audios]
        for seg in segments:  # iterating runs the decoder: in the calling thread
            per[seek_of[int(seg.seek)]].append(seg)
        self.batched_calls += 1
        out: list[list[Segment]] = []
        for i, segs in enumerate(per):
            looped = _loop_may_hide_speech(segs)
            out.append(alone(audios[i]) if looped else _kept(segs, fw_starts[i] / SAMPLE_RATE))
        return out

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]:
        """Every word of a packed window, in order, with window times; no prompt (the
        window holds several sessions). Words of a segment below the confidence floor
        come back marked unreliable rather than dropped: `packing.split` decides."""
        return [
            RawWord(
                w.word,
                float(w.start),
                float(w.end),
                float(w.probability),
                i,
                _sound(seg),
            )
            for i, seg in enumerate(self._segments(audio, language, beam_size, True, None)[0])
            for w in (seg.words or ())
        ]

    def _segments(
        self,
        audio: Audio,
        language: str | None,
        beam_size: int,
        word_timestamps: bool,
        prompt: str | None,
    ) -> tuple[list[Any], tuple[tuple[str, float], ...]]:
        """faster-whisper's segments of one decode, and the languages it detected (most
        probable first; empty when the language was given or the model is English-only)."""
        if not self.multilingual:
            language = "en"
        frames = encode_frames(len(audio), self.encode_min_s)
        out, info = self._decode(audio, frames, language, beam_size, word_timestamps, prompt)
        if frames < FULL_WINDOW_FRAMES and _loop_may_hide_speech(out):
            self.window_retries += 1
            full = FULL_WINDOW_FRAMES
            out, info = self._decode(audio, full, language, beam_size, word_timestamps, prompt)
        detected: tuple[tuple[str, float], ...] = ()
        if language is None:
            probs = getattr(info, "all_language_probs", None) or [
                (info.language, info.language_probability)
            ]
            detected = tuple((str(lang), float(p)) for lang, p in probs[:TOP_LANGUAGES])
        return out, detected

    def _decode(
        self,
        audio: Audio,
        frames: int,
        language: str | None,
        beam_size: int,
        word_timestamps: bool,
        prompt: str | None,
    ) -> tuple[list[Any], Any]:
        self._model.encode_frames = frames  # for this thread's call only
        segments, info = self._model.transcribe(
            audio,
            language=language,
            beam_size=beam_size,
            word_timestamps=word_timestamps,
            vad_filter=False,  # we segment with our own streaming VAD
            condition_on_previous_text=False,
            initial_prompt=prompt or None,  # the session's previous final: context, as offline
            without_timestamps=not word_timestamps,
            temperature=0.0,  # no fallback: see TRAILING_SEGMENT_MIN_LOGPROB
            max_new_tokens=max_new_tokens(len(audio)),  # cuts a loop short
        )
        # Iterating runs the decoder: keep it in the calling thread.
        return list(segments), info

    def warm_up(self) -> None:
        """Run the model once so the first real session does not pay for lazy init."""
        t = np.linspace(0, 1, SAMPLE_RATE, dtype=np.float32)
        self.transcribe(
            0.1 * np.sin(2 * np.pi * 220 * t).astype(np.float32),
            language=None,
            word_timestamps=True,
            beam_size=1,
        )


def _kept(segments: list[Any], offset: float = 0.0) -> list[Segment]:
    """One decode's faster-whisper segments as ours, times less `offset` (never below 0):
    the first segment, and later ones only if they are confident speech (`_sound`; the
    rest is a guess at the utterance's silent tail)."""

    def t(value: Any) -> float:  # a batched clip's times can round to just before it
        return max(0.0, float(value) - offset)

    out: list[Segment] = []
    for i, seg in enumerate(segments):
        if i > 0 and not _sound(seg):
            continue
        words = tuple(
            Word(w.word.strip(), t(w.start), t(w.end), float(w.probability))
            for w in (seg.words or ())
        )
        text = seg.text.strip()
        if text:
            out.append(Segment(t(seg.start), t(seg.end), text, words))
    return out


@functools.cache
def _batched_pipeline(model: Any) -> Any:
    """faster-whisper's batched pipeline over the worker's one model (made once)."""
    from faster_whisper import BatchedInferencePipeline

    return BatchedInferencePipeline(model=model)


def _looping(seg: Any) -> bool:
    return float(getattr(seg, "compression_ratio", 0.0)) > COMPRESSION_RATIO_MAX


def _loop_may_hide_speech(segments: list[Any]) -> bool:
    """Whether a decode over a short window looped where there may be speech: in its first
    segment, or in a later one the model does not rate as likely non-speech. A later loop
    the model rates as non-speech (`no_speech_prob` >= TRAILING_SEGMENT_NO_SPEECH) is the
    silent tail after the last word: `_sound` drops it, and the first segment stands
    without a full-window decode. Measured on the fixture that loops ("The little boat
    sailed away.", then dots with no_speech_prob 0.92): the first segment was the right
    text, and the full window that used to replace it heard "sailed that way"."""
    return any(
        _looping(seg)
        and (i == 0 or float(getattr(seg, "no_speech_prob", 0.0)) < TRAILING_SEGMENT_NO_SPEECH)
        for i, seg in enumerate(segments)
    )


def _sound(seg: Any) -> bool:
    """Whether a segment is confident speech: not below the log-probability floor, not a
    decoding loop, and not text the model itself rates as likely non-speech."""
    no_speech = (
        float(getattr(seg, "no_speech_prob", 0.0)) >= TRAILING_SEGMENT_NO_SPEECH
        and seg.avg_logprob < TRAILING_SEGMENT_NO_SPEECH_LOGPROB
    )
    return seg.avg_logprob >= TRAILING_SEGMENT_MIN_LOGPROB and not _looping(seg) and not no_speech


@functools.cache
def _windowed_model_class() -> Any:
    """faster-whisper's WhisperModel, encoding only the frames the current call needs.

    faster-whisper hands `encode` a window padded to 30 s; the frames past
    `encode_frames` are that padding (`_segments` sizes it from the call's audio), so
    they are cut off before CTranslate2 sees them. Word alignment is given the content
    length, which is never more than the encoded frames.
    """
    from faster_whisper import WhisperModel

    class WindowedWhisperModel(WhisperModel):  # type: ignore[misc]
        # Per calling thread: with several decode threads each call has its own window.
        _window = threading.local()
        encodes_saved = 0  # detecting calls whose decode reused the detection's encode

        @property
        def encode_frames(self) -> int:
            return int(getattr(self._window, "frames", FULL_WINDOW_FRAMES))

        @encode_frames.setter
        def encode_frames(self, frames: int) -> None:
            self._window.frames = frames

        def encode(self, features: Any) -> Any:
            if getattr(features, "shape", (0,))[-1] > self.encode_frames:
                features = features[..., : self.encode_frames]
            kept = getattr(self._window, "detected", None)
            if kept is not None:
                self._window.detected = None
                if kept[0].shape == features.shape and np.array_equal(kept[0], features):
                    self.encodes_saved += 1
                    return kept[1]
            return super().encode(features)

        def detect_language(
            self,
            audio: Any = None,
            features: Any = None,
            vad_filter: bool = False,
            vad_parameters: Any = None,
            language_detection_segments: int = 1,
            language_detection_threshold: float = 0.5,
        ) -> tuple[str, float, list[tuple[str, float]]]:
            """Detect on the window the decode itself will encode, and keep its encoder
            output for that decode (`encode`), so a call that detects encodes once.

            faster-whisper detects on the first 30 s of the features, last frame
            included, then decodes a window of those features without their last frame
            (zero in its place) and encodes again. Here detection takes the decode's
            window, so the second encode finds the same input and reuses the first's
            output: the decode is exactly the one faster-whisper would make, and the
            detection sees 10 ms less audio. Only for what `transcribe` asks (features
            from the start, one detection segment); anything else is faster-whisper's."""
            if features is None or audio is not None or language_detection_segments != 1:
                return super().detect_language(  # type: ignore[no-any-return]
                    audio,
                    features,
                    vad_filter,
                    vad_parameters,
                    language_detection_segments,
                    language_detection_threshold,
                )
            from faster_whisper.audio import pad_or_trim

            window = self.feature_extractor.nb_max_frames
            segment = pad_or_trim(features[:, : min(window, features.shape[-1] - 1)])
            if segment.shape[-1] > self.encode_frames:
                segment = segment[..., : self.encode_frames]
            output = super().encode(segment)
            self._window.detected = (segment, output)
            probs = [(token[2:-2], prob) for token, prob in self.model.detect_language(output)[0]]
            return probs[0][0], probs[0][1], probs

    return WindowedWhisperModel


class NullEngine:
    """No model: returns one fixed word per second of audio. Measures the pipeline alone."""

    name = "null"
    can_pack = True
    can_batch = True

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        seconds = len(audio) / SAMPLE_RATE
        n = max(1, int(seconds))
        words = tuple(Word("speech", i * seconds / n, (i + 1) * seconds / n, 1.0) for i in range(n))
        return [
            Segment(0.0, seconds, " ".join(w.word for w in words), words if word_timestamps else ())
        ]

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]:
        """One word per second of each stretch of non-zero audio (packing guards are
        exact zeros), so a packed window splits back like a real one would."""
        nonzero = np.flatnonzero(audio)
        if nonzero.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(nonzero) > 1)
        starts = np.concatenate([[nonzero[0]], nonzero[breaks + 1]])
        ends = np.concatenate([nonzero[breaks], [nonzero[-1]]]) + 1
        out: list[RawWord] = []
        for k, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            seconds = (hi - lo) / SAMPLE_RATE
            n = max(1, int(seconds))
            for i in range(n):
                a = lo / SAMPLE_RATE + i * seconds / n
                out.append(RawWord(" speech", a, a + seconds / n, 1.0, k))
        return out

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[list[Segment]]:
        return [
            self.transcribe(
                a, language=language, word_timestamps=word_timestamps, beam_size=beam_size
            )
            for a in audios
        ]

    def warm_up(self) -> None:
        pass


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # no CUDA runtime at all
        return "cpu"


class StreamingVad:
    """Silero VAD (the copy faster-whisper ships) fed 512-sample windows as audio arrives.

    Keeps the LSTM state and the 64-sample context between calls, exactly as
    faster-whisper's own batch call does within one long array. One instance per session.
    """

    _shared_session: Any = None

    def __init__(self) -> None:
        if StreamingVad._shared_session is None:
            from faster_whisper.vad import get_vad_model

            StreamingVad._shared_session = get_vad_model().session
        self._session = StreamingVad._shared_session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_VAD_CONTEXT, dtype=np.float32)

    def __call__(self, windows: Audio) -> npt.NDArray[np.float32]:
        """Speech probability for each whole 512-sample window of `windows`."""
        batch = windows.reshape(-1, VAD_WINDOW)
        if batch.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        contexts = np.concatenate([self._context[None, :], batch[:-1, -_VAD_CONTEXT:]], axis=0)
        inputs = np.concatenate([contexts, batch], axis=1).astype(np.float32)
        out, self._h, self._c = self._session.run(
            None, {"input": inputs, "h": self._h, "c": self._c}
        )
        self._context = batch[-1, -_VAD_CONTEXT:].copy()
        return np.asarray(out, dtype=np.float32).reshape(-1)


class EnergyVad:
    """No model: a 512-sample window is speech (1.0) when its RMS level reaches
    `threshold`, else silence (0.0). For measuring the pipeline with the null engine at
    a scale where Silero's cost per window would dominate; it cannot tell speech from
    noise."""

    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = threshold
        # RMS >= threshold, compared as a sum of squares: one numpy call per batch
        # instead of four (square, mean, sqrt, compare all showed in the null profile).
        self._min_energy = threshold * threshold * VAD_WINDOW

    def __call__(self, windows: Audio) -> npt.NDArray[np.float32]:
        batch = windows.reshape(-1, VAD_WINDOW)
        energy: npt.NDArray[np.float32] = np.einsum("ij,ij->i", batch, batch)
        return np.asarray(energy >= self._min_energy, dtype=np.float32)


def make_vad(kind: str) -> StreamingVad | EnergyVad:
    """A fresh per-session VAD: `silero` or `energy` (Config.vad)."""
    return EnergyVad() if kind == "energy" else StreamingVad()


def load_engine(
    kind: str,
    model: str,
    device: str,
    compute_type: str,
    cpu_threads: int,
    encode_min_s: float = 30.0,
    workers: int = 1,
    cache_dir: str | None = None,
) -> Engine:
    """The engine a worker runs. `cpu_threads` 0: the cores shared out among `workers`
    concurrent decodes (at least one thread each). `cache_dir`: where a model shipped in
    parts is joined (worker/models.py)."""
    if kind == "null":
        return NullEngine()
    if cpu_threads == 0:
        cpu_threads = max(1, (os.cpu_count() or 1) // workers)
    return WhisperEngine(
        model, pick_device(device), compute_type, cpu_threads, encode_min_s, workers, cache_dir
    )
