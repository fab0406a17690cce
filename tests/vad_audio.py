"""Synthetic audio for segmentation tests: whole 512-sample VAD windows at 16 kHz.

"Speech" is a constant 0.5 and "silence" zeros; `fake_vad` says 1.0 for a window whose mean
absolute amplitude is over 0.1, else 0.0, so sample positions follow from window counts.
"""

from __future__ import annotations

import numpy as np

from worker.engine import VAD_WINDOW, Audio

W = VAD_WINDOW


def speech(windows: int) -> Audio:
    return np.full(windows * W, 0.5, np.float32)


def silence(windows: int) -> Audio:
    return np.zeros(windows * W, np.float32)


def fake_vad(audio: Audio) -> np.ndarray:
    """Speech probability per 512-sample window: 1.0 if loud, else 0.0."""
    assert audio.size % W == 0, "the VAD must only ever see whole windows"
    loud = np.abs(audio.reshape(-1, W)).mean(axis=1) > 0.1
    return np.where(loud, 1.0, 0.0).astype(np.float32)
