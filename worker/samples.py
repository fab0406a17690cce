"""The speech clips shipped inside the `worker` package (`calibration_audio/`).

A worker with `slots` auto times its engine on them at start-up (worker/calibration.py),
and `streamscribe loadtest` streams them when given no `--audio`. Kept apart from the
calibration (which needs the engine) so that a client imports nothing heavy for them.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

#: espeak-ng speech, 16 kHz mono 16-bit PCM, 6.2-7.2 s each, with `<name>.txt` beside.
CLIP_NAMES = ("c1", "c2", "c3", "c4")


def clip_files() -> list[Traversable]:
    """The clips' WAV files, in CLIP_NAMES order."""
    folder = resources.files("worker") / "calibration_audio"
    return [folder / f"{name}.wav" for name in CLIP_NAMES]
