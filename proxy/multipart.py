"""The few facts metering needs from a multipart/form-data body (image edits, audio
transcriptions): its text fields, and its files' sizes, first bytes and durations.

The body is forwarded as it came; this only reads it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

_DISPOSITION = re.compile(rb'name="([^"]*)"(?:; filename="([^"]*)")?', re.IGNORECASE)
_MAX_FIELD = 64 * 1024  # text fields beyond this are not kept (a prompt is far shorter)
_AUDIO_BOUND_BYTES_PER_SECOND = 2000  # 16 kbit/s: below any real speech codec's rate


@dataclass
class FormFile:
    name: str
    filename: str
    size: int
    head: bytes  # the first bytes: what a format's header says


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[FormFile] = field(default_factory=list)


def boundary_of(content_type: str) -> bytes | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1).encode() if m else None


def parse(body: bytes, content_type: str) -> Form | None:
    """None when the body is not the multipart form its Content-Type says."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    form = Form()
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        data = data[:-2] if data.endswith(b"\r\n") else data
        m = _DISPOSITION.search(head)
        if m is None:
            continue
        name = m.group(1).decode("utf-8", "replace")
        if m.group(2) is not None:
            form.files.append(FormFile(name, m.group(2).decode("utf-8", "replace"), len(data),
                                       data[:65536]))  # fmt: skip
        elif len(data) <= _MAX_FIELD:
            form.fields[name] = data.decode("utf-8", "replace")
    return form


def audio_seconds(f: FormFile) -> tuple[int, bool]:
    """(seconds, exact) of an audio file: from its header for WAV, FLAC and constant-rate
    MP3; otherwise an upper bound from its size."""
    exact = _wav(f.head) or _flac(f.head) or _mp3(f.head, f.size)
    if exact is not None:
        return max(1, round(exact)), True
    return max(1, -(-f.size // _AUDIO_BOUND_BYTES_PER_SECOND)), False


def _wav(head: bytes) -> float | None:
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            byte_rate = struct.unpack("<I", head[pos + 16 : pos + 20])[0]
        elif chunk == b"data" and byte_rate:
            return float(size) / int(byte_rate)
        pos += 8 + size + (size & 1)
    return None


def _flac(head: bytes) -> float | None:
    if head[:4] != b"fLaC" or len(head) < 26:
        return None
    info = int.from_bytes(head[18:26], "big")
    rate = info >> 44
    samples = info & ((1 << 36) - 1)
    return samples / rate if rate and samples else None


_MP3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)


def _mp3(head: bytes, size: int) -> float | None:
    start = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        tag = head[6:10]
        start = 10 + ((tag[0] << 21) | (tag[1] << 14) | (tag[2] << 7) | tag[3])
    i = head.find(b"\xff", start)
    while 0 <= i < len(head) - 4:
        b1, b2 = head[i + 1], head[i + 2]
        if b1 & 0xE0 == 0xE0 and (b1 >> 3) & 3 == 3 and (b1 >> 1) & 3 == 1:  # MPEG-1 layer III
            index = b2 >> 4
            if 0 < index < 15:
                if b"Xing" in head[i : i + 64] or b"Info" in head[i : i + 64]:
                    return None  # variable rate: the size says too little
                return (size - start) * 8 / (_MP3_KBPS[index] * 1000)
        i = head.find(b"\xff", i + 1)
    return None
