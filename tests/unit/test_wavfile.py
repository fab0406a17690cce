"""Unit tests for shared/wavfile.py: reading WAV files and splitting them into frames."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import pytest

from shared.wavfile import WavAudio, read_wav

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "audio"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {name} is not present")
    return path


def write_wave(path: Path, *, width: int, channels: int, rate: int, frames: bytes) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def riff(*chunks: tuple[bytes, bytes]) -> bytes:
    """A RIFF/WAVE file from (id, body) chunks, with the odd-size pad byte where needed."""
    body = b"WAVE"
    for cid, data in chunks:
        body += cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) & 1 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt(tag: int, channels: int, rate: int, bits: int, extra: bytes = b"") -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits) + extra


@pytest.mark.parametrize(
    ("name", "rate", "channels", "encoding"),
    [
        ("s1.wav", 16000, 1, "pcm_s16le"),
        ("s1_f32_16k.wav", 16000, 1, "pcm_f32le"),
        ("s1_8k_stereo.wav", 8000, 2, "pcm_s16le"),
    ],
)
def test_reads_committed_fixtures(name: str, rate: int, channels: int, encoding: str) -> None:
    """Each committed fixture reads with its rate, channels, encoding and manifest length."""
    audio = read_wav(fixture(name))
    assert (audio.sample_rate, audio.channels, audio.encoding) == (rate, channels, encoding)
    manifest = (fixture("manifest.tsv")).read_text().splitlines()
    durations = {row.split("\t")[1]: float(row.split("\t")[2]) for row in manifest[1:]}
    assert audio.duration_s == pytest.approx(durations[name], abs=0.01)
    width = 2 if encoding == "pcm_s16le" else 4
    assert len(audio.data) % (width * channels) == 0
    assert any(audio.data)  # not silence


def test_read_wav_accepts_str_paths() -> None:
    """read_wav takes a str path as well as a Path."""
    assert read_wav(str(fixture("s1.wav"))).sample_rate == 16000


def test_reads_16_bit_wav_written_by_stdlib(tmp_path: Path) -> None:
    """A 16-bit stereo WAV from the wave module reads back with the exact sample bytes."""
    frames = struct.pack("<4h", 1, -1, 32767, -32768)
    audio = read_wav(write_wave(tmp_path / "a.wav", width=2, channels=2, rate=22050, frames=frames))
    assert audio == WavAudio(frames, 22050, 2, "pcm_s16le")
    assert audio.bytes_per_second == 22050 * 4


def test_rejects_non_riff_bytes(tmp_path: Path) -> None:
    """A file that is not RIFF/WAVE raises ValueError."""
    path = tmp_path / "x.wav"
    path.write_bytes(b"ID3\x04not a wav file at all")
    with pytest.raises(ValueError, match="not a RIFF/WAVE"):
        read_wav(path)


def test_rejects_riff_that_is_not_wave(tmp_path: Path) -> None:
    """A RIFF container of another form (AVI) raises ValueError."""
    path = tmp_path / "x.avi"
    path.write_bytes(b"RIFF\x04\x00\x00\x00AVI ")
    with pytest.raises(ValueError, match="not a RIFF/WAVE"):
        read_wav(path)


def test_rejects_8_bit_wav(tmp_path: Path) -> None:
    """An 8-bit PCM WAV written by the wave module raises ValueError naming the bit depth."""
    path = write_wave(tmp_path / "u8.wav", width=1, channels=1, rate=8000, frames=bytes(80))
    with pytest.raises(ValueError, match="8 bits"):
        read_wav(path)


def test_rejects_24_bit_wav(tmp_path: Path) -> None:
    """A 24-bit PCM WAV raises ValueError (only 16-bit PCM or 32-bit float)."""
    path = write_wave(tmp_path / "s24.wav", width=3, channels=1, rate=8000, frames=bytes(30))
    with pytest.raises(ValueError, match="24 bits"):
        read_wav(path)


def test_rejects_32_bit_integer_pcm(tmp_path: Path) -> None:
    """32-bit integer PCM (format 1) is not mistaken for float."""
    path = tmp_path / "s32.wav"
    path.write_bytes(riff((b"fmt ", fmt(1, 1, 16000, 32)), (b"data", bytes(8))))
    with pytest.raises(ValueError, match="format 1, 32 bits"):
        read_wav(path)


def test_rejects_missing_data_chunk(tmp_path: Path) -> None:
    """A WAV with a fmt chunk but no data chunk raises ValueError."""
    path = tmp_path / "nodata.wav"
    path.write_bytes(riff((b"fmt ", fmt(1, 1, 16000, 16))))
    with pytest.raises(ValueError, match="missing fmt or data"):
        read_wav(path)


def test_rejects_truncated_fmt_chunk(tmp_path: Path) -> None:
    """A fmt chunk shorter than 16 bytes raises ValueError, like every other bad file."""
    path = tmp_path / "shortfmt.wav"
    path.write_bytes(riff((b"fmt ", fmt(1, 1, 16000, 16)[:8]), (b"data", bytes(4))))
    with pytest.raises(ValueError):
        read_wav(path)


def test_skips_other_chunks_including_odd_sized_ones(tmp_path: Path) -> None:
    """LIST chunks of odd size (with their pad byte) before data are skipped correctly."""
    samples = struct.pack("<3h", 100, -200, 300)
    path = tmp_path / "list.wav"
    path.write_bytes(
        riff((b"fmt ", fmt(1, 1, 16000, 16)), (b"LIST", b"INFOabc"), (b"data", samples))
    )
    assert read_wav(path).data == samples


def test_reads_extensible_float(tmp_path: Path) -> None:
    """WAVE_FORMAT_EXTENSIBLE with the float sub-format reads as pcm_f32le."""
    extra = struct.pack("<HHI", 22, 32, 0b11) + struct.pack("<H", 3) + bytes(14)
    samples = struct.pack("<4f", 0.5, -0.5, 0.25, -0.25)
    path = tmp_path / "ext.wav"
    path.write_bytes(riff((b"fmt ", fmt(0xFFFE, 2, 48000, 32, extra)), (b"data", samples)))
    audio = read_wav(path)
    assert (audio.encoding, audio.channels, audio.sample_rate) == ("pcm_f32le", 2, 48000)
    assert audio.data == samples


def test_partial_trailing_sample_is_dropped(tmp_path: Path) -> None:
    """A data chunk that ends mid-frame is cut back to whole sample instants."""
    path = tmp_path / "ragged.wav"
    path.write_bytes(riff((b"fmt ", fmt(1, 2, 16000, 16)), (b"data", bytes(4 * 3 + 3))))
    assert len(read_wav(path).data) == 12


@pytest.mark.parametrize(
    ("rate", "channels", "encoding", "frame_ms", "step"),
    [
        (16000, 1, "pcm_s16le", 20, 640),
        (8000, 2, "pcm_s16le", 20, 640),
        (16000, 1, "pcm_f32le", 100, 6400),
        (44100, 2, "pcm_s16le", 20, 882 * 4),
        (44100, 2, "pcm_f32le", 30, 1323 * 8),
        (8000, 1, "pcm_s16le", 0, 2),  # below one sample: one sample per frame
    ],
)
def test_frames_split_at_whole_samples(
    rate: int, channels: int, encoding: str, frame_ms: int, step: int
) -> None:
    """frames() cuts frame_ms of audio per frame, whole samples for every channel; last shorter."""
    width = 2 if encoding == "pcm_s16le" else 4
    data = bytes(range(256)) * 200
    data = data[: len(data) // (width * channels) * (width * channels)]
    frames = WavAudio(data, rate, channels, encoding).frames(frame_ms)
    assert b"".join(frames) == data
    assert all(len(f) == step for f in frames[:-1])
    assert 0 < len(frames[-1]) <= step
    assert all(len(f) % (width * channels) == 0 for f in frames)


def test_frames_of_fixture_cover_the_file() -> None:
    """The 8 kHz stereo fixture splits into 20 ms frames that rejoin to the original bytes."""
    audio = read_wav(fixture("s1_8k_stereo.wav"))
    frames = audio.frames(20)
    assert b"".join(frames) == audio.data
    assert len(frames) == -(-len(audio.data) // 640)


def test_frames_of_empty_audio() -> None:
    """Empty audio gives no frames."""
    assert WavAudio(b"", 16000, 1, "pcm_s16le").frames(20) == []
