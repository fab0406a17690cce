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
    dropping old samples moves an offset; the live part is compacted only when the storage
    must grow anyway or its dead head is at least as long as the live part. Concatenating
    onto an array instead copied the whole open utterance (up to `max_utterance_s`) for
    every frame."""

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
            live = self._data[self._head : self._head + self._len]
            if self._len + n > self._data.size // 2 or self._head < self._len:
                data = np.empty(max(2 * self._data.size, 2 * (self._len + n)), np.float32)
            else:
                data = self._data  # plenty of room once the dead head is dropped
            data[: self._len] = live  # (overlapping move within one array is safe here)
            self._data, self._head = data, 0
        tail = self._head + self._len
        self._data[tail : tail + n] = samples
        self._len += n

    def view(self, start: int, end: int) -> Audio:
        """Samples [start, end) without copying; valid until the next `append`."""
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
        if self._len == 0:
            self._head = 0
