"""What metering reads from a multipart form: fields, file sizes, audio durations."""

from __future__ import annotations

import struct

from proxy.multipart import FormFile, audio_seconds, parse


def wav(seconds: int, rate: int = 16000) -> bytes:
    data = rate * 2 * seconds
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data))  # fmt: skip


def test_form_fields_and_files() -> None:
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + wav(3) + b"\x00" * 96000 + b"\r\n--xyz--\r\n")  # fmt: skip
    form = parse(body, "multipart/form-data; boundary=xyz")
    assert form is not None and form.fields == {"model": "whisper-1"}
    (f,) = form.files
    assert (f.name, f.filename, f.size) == ("file", "a.wav", 44 + 96000)
    assert audio_seconds(f) == (3, True)


def test_durations_by_format() -> None:
    mp3 = b"\xff\xfb\x90\x00" + b"\x00" * 100  # MPEG-1 layer III, 128 kbit/s
    assert audio_seconds(FormFile("file", "a.mp3", 16_000 * 60, mp3)) == (60, True)
    flac = b"fLaC" + b"\x00" * 14 + ((44100 << 44) | (44100 * 30)).to_bytes(8, "big")
    assert audio_seconds(FormFile("file", "a.flac", 1000, flac)) == (30, True)
    # Anything else: an upper bound from the size, at 16 kbit/s.
    assert audio_seconds(FormFile("file", "a.m4a", 200_000, b"....ftyp")) == (100, False)
