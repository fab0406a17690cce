"""Client audio bytes -> float32 mono 16 kHz, one stateful converter per session.

Gateways store frames exactly as clients sent them (declared rate, encoding, channels);
the worker converts here. Stereo is downmixed by averaging; other rates go through
libswresample (PyAV, a faster-whisper dependency), whose state carries across frames so
frame boundaries leave no clicks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.protocol import SessionParams

TARGET_RATE = 16000
Audio = npt.NDArray[np.float32]


class AudioConverter:
    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self._resampler = None
        if params.sample_rate != TARGET_RATE:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
        # Bytes per sample instant where `samples_in` can tell the count (0: it cannot).
        self._width = 0 if self._resampler is not None else params.bytes_per_frame

    def samples_in(self, size: int) -> int | None:
        """How many output samples `convert` makes of `size` bytes, where that is known
        without converting them: no resampler, whole sample instants. Such chunks can be
        joined and converted at once with the same result (the worker batches the frames
        of one read that way); None where it is not."""
        width = self._width
        if not width or size % width:
            return None
        return size // width

    def convert(self, pcm: bytes) -> Audio:
        if self.params.encoding == "pcm_s16le":
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(pcm, dtype="<f4").astype(np.float32)
            samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
            np.clip(samples, -1.0, 1.0, out=samples)
        if self.params.channels == 2:
            samples = samples.reshape(-1, 2).mean(axis=1, dtype=np.float32)
        if self._resampler is None:
            return samples
        return self._resample(samples)

    def _resample(self, samples: Audio) -> Audio:
        import av

        assert self._resampler is not None
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self.params.sample_rate
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def flush(self) -> Audio:
        """Whatever the resampler still holds (call at the end of the stream)."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class SampleBuffer:
    """A session's recent samples, addressed by absolute sample index.

    Appending copies only the new samples (amortised: the storage doubles when full), and
    dropping old samples moves an offset; the live part is copied to fresh storage only
    when the storage is full. Concatenating onto an array instead copied the whole open
    utterance (up to `max_utterance_s`) for every frame.

    Storage is written once: appends go past the newest sample and a full storage is
    replaced, never compacted in place. So a `view` never changes, and a decode can be
    handed one (read in another thread while the VAD thread appends) instead of a copy
    of the utterance for every interim and final."""

    __slots__ = ("_data", "_head", "_len", "start")

    def __init__(self, start: int = 0, capacity: int = TARGET_RATE) -> None:
        self._data = np.zeros(max(1, capacity), np.float32)
        self._head = 0  # storage index of sample `start`
        self._len = 0
        self.start = start  # absolute index of the oldest sample kept

    @property
    def end(self) -> int:
        """Absolute index one past the newest sample."""
        return self.start + self._len

    def __len__(self) -> int:
        return self._len

    def append(self, samples: Audio) -> None:
        n = samples.size
        if self._head + self._len + n > self._data.size:
            size = self._data.size
            if self._len + n > size // 2:
                size = max(2 * size, 2 * (self._len + n))
            data = np.empty(size, np.float32)  # the same size while half of it is dead
            data[: self._len] = self._data[self._head : self._head + self._len]
            self._data, self._head = data, 0
        tail = self._head + self._len
        self._data[tail : tail + n] = samples
        self._len += n

    def view(self, start: int, end: int) -> Audio:
        """Samples [start, end) without copying. They never change: later appends and
        drops leave this storage's samples as they are (see the class)."""
        if start < self.start or end > self.end or start > end:
            raise IndexError(f"samples [{start}, {end}) not in [{self.start}, {self.end})")
        lo = self._head + start - self.start
        return self._data[lo : lo + end - start]

    def drop_before(self, keep: int) -> None:
        """Forget every sample before absolute index `keep` (clamped to what is held)."""
        keep = min(max(keep, self.start), self.end)
        self._head += keep - self.start
        self._len -= keep - self.start
        self.start = keep
