"""Unit tests for the model-free energy VAD (worker/engine.py `EnergyVad`, Config.vad)."""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from shared.errors import ConfigError
from worker.engine import VAD_WINDOW, EnergyVad, StreamingVad, make_vad


def test_loud_windows_are_speech_quiet_ones_silence_at_the_threshold_edge() -> None:
    vad = EnergyVad(threshold=0.01)
    windows = np.concatenate(
        [
            np.full(VAD_WINDOW, 0.0101, np.float32),  # RMS just over the threshold: speech
            np.full(VAD_WINDOW, 0.0099, np.float32),  # just under: silence
            np.zeros(VAD_WINDOW, np.float32),
            np.full(VAD_WINDOW, -0.5, np.float32),
        ]
    )
    assert vad(windows).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_make_vad_follows_the_setting() -> None:
    assert isinstance(make_vad("energy"), EnergyVad)
    assert isinstance(make_vad("silero"), StreamingVad)


def test_config_accepts_only_known_vads() -> None:
    assert Config(vad="energy").vad == "energy"
    with pytest.raises(ConfigError, match="VAD"):
        Config(vad="webrtc")
