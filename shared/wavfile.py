"""Read WAV files (16-bit PCM or 32-bit float, any rate, mono or stereo) without numpy."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WavAudio:
    data: bytes
    sample_rate: int
    channels: int
    encoding: str  # protocol encoding name

    @property
    def bytes_per_second(self) -> int:
        width = 2 if self.encoding == "pcm_s16le" else 4
        return width * self.channels * self.sample_rate

    @property
    def duration_s(self) -> float:
        return len(self.data) / self.bytes_per_second

    def frames(self, frame_ms: int) -> list[bytes]:
        """Split into frames of `frame_ms` of audio (whole samples; the last may be shorter)."""
        width = 2 if self.encoding == "pcm_s16le" else 4
        step = max(1, self.sample_rate * frame_ms // 1000) * width * self.channels
        return [self.data[i : i + step] for i in range(0, len(self.data), step)]


def read_wav(path: str | Path) -> WavAudio:
    raw = Path(path).read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(raw):
        cid, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        body = raw[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise ValueError(f"{path}: missing fmt or data chunk")
    if len(fmt) < 16:
        raise ValueError(f"{path}: truncated fmt chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if tag == 1 and bits == 16:
        encoding = "pcm_s16le"
    elif tag == 3 and bits == 32:
        encoding = "pcm_f32le"
    else:
        raise ValueError(
            f"{path}: only 16-bit PCM or 32-bit float WAV is supported (format {tag}, {bits} bits)"
        )
    frame = (bits // 8) * channels
    return WavAudio(data[: len(data) // frame * frame], rate, channels, encoding)
