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
