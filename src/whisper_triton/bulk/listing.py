"""What there is to transcribe: the audio objects under an S3 prefix, filtered by suffix and size, each
with its audio length read from the first bytes of the object (a ranged GET, never the whole file).

Lengths: WAV from its header's data size and byte rate; FLAC, WebM, MP4 with its index in front and
MP3 with a Xing/Info header from what FFmpeg reads in the container header; any other file that fits
in the probe is decoded (all exact). Otherwise an estimate (flagged `exact=False`): the stream's bit
rate over the object's size, or the audio the probe's packets hold scaled by size (Ogg), or 64 kbit/s.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import av

from ..deploy.aws import parse_s3_uri
from ..pipeline.audio import SAMPLE_RATE, decode_audio, open_audio

logger = logging.getLogger(__name__)

PROBE_BYTES = 256 * 1024
ASSUMED_BITS_PER_SECOND = 64_000  # a compressed file whose length nothing states
# what the container header states exactly (FFmpeg's demuxer reads it from the header, not the data)
_HEADER_EXACT = {"flac", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2"}
DEFAULT_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".webm")


class BulkError(Exception):
    """The run cannot go on: the cause and the fix."""


@dataclass(frozen=True)
class Location:
    """An s3://bucket/prefix; `folder` is the prefix up to its last '/' (paths are kept under it)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str, what: str) -> "Location":
        try:
            bucket, prefix = parse_s3_uri(uri)
        except ValueError as exc:
            raise BulkError(f"The {what} {uri!r} is not an s3:// URI ({exc}); pass s3://BUCKET/PREFIX.") from exc
        return cls(bucket, prefix)

    @property
    def folder(self) -> str:
        return self.prefix[: self.prefix.rfind("/") + 1]

    def key(self, relative: str) -> str:
        base = self.prefix.rstrip("/")
        return f"{base}/{relative}" if base else relative

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key or self.prefix}"


@dataclass
class AudioObject:
    key: str
    relative: str  # the key under the input folder: outputs are named after it
    size: int
    seconds: float | None = None
    exact: bool = False


@dataclass(frozen=True)
class Filters:
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES  # empty: every object
    min_bytes: int = 1
    max_bytes: int | None = None

    def admits(self, key: str, size: int) -> bool:
        if key.endswith("/"):
            return False
        if self.suffixes and not key.lower().endswith(tuple(s.lower() for s in self.suffixes)):
            return False
        return size >= self.min_bytes and (self.max_bytes is None or size <= self.max_bytes)


def list_audio(s3: Any, source: Location, filters: Filters) -> tuple[list[AudioObject], int]:
    """(the objects the filters admit, sorted by key; how many objects they left out)."""
    admitted, left_out = [], 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
            for item in page.get("Contents", []):
                if filters.admits(item["Key"], item["Size"]):
                    admitted.append(AudioObject(item["Key"], item["Key"][len(source.folder):], item["Size"]))
                else:
                    left_out += 1
    except Exception as exc:  # noqa: BLE001
        raise BulkError(f"Could not list {source.uri()}: {exc}. Check the bucket name, the region and "
                        "s3:ListBucket for your credentials.") from exc
    return sorted(admitted, key=lambda o: o.key), left_out


def _wav_seconds(head: bytes, size: int) -> float | None:
    """A RIFF/WAVE file's length from its fmt and data chunks."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= len(head):
        chunk, length = head[position:position + 4], struct.unpack("<I", head[position + 4:position + 8])[0]
        if chunk == b"fmt " and position + 16 <= len(head):
            byte_rate = struct.unpack("<I", head[position + 16:position + 20])[0]
        if chunk == b"data":
            if not byte_rate:
                return None
            data = size - position - 8 if length in (0, 0xFFFFFFFF) else min(length, size - position - 8)
            return max(0.0, data / byte_rate)
        position += 8 + length + (length & 1)
    return None


def probe_seconds(head: bytes, size: int) -> tuple[float, bool]:
    """(audio seconds, exact) of an object of `size` bytes from its first bytes `head`."""
    wav = _wav_seconds(head, size)
    if wav is not None:
        return wav, True
    whole = len(head) >= size
    try:
        with open_audio(head) as container:  # the decoder's whitelist: a probe reaches nothing outside the bytes
            stream = container.streams.audio[0] if container.streams.audio else None
            duration = container.duration / av.time_base if container.duration else 0.0
            name = container.format.name
            if name in _HEADER_EXACT and duration > 0:
                return duration, True
            bit_rate = (stream.bit_rate if stream is not None else 0) or 0
            if name == "mp3" and bit_rate and duration > 0 and not whole:
                from_buffer = len(head) * 8 / bit_rate  # FFmpeg's own estimate when no Xing header states it
                if abs(duration - from_buffer) > 0.05 * duration:
                    return duration, True
            if not whole:
                if bit_rate:
                    return size * 8 / bit_rate, False
                covered = _seconds_in(container, stream) if stream is not None else 0.0
                if covered > 0:
                    return covered * size / len(head), False
    except Exception:  # noqa: BLE001 - an estimate; an unreadable file fails later, when it is sent
        pass
    if whole:  # small enough to decode: Ogg's and raw streams' own timing is not to be trusted
        try:
            return decode_audio(head).size / SAMPLE_RATE, True
        except Exception:  # noqa: BLE001 - not audio: the server will say so
            pass
    return size * 8 / ASSUMED_BITS_PER_SECOND, False


def _seconds_in(container: Any, stream: Any) -> float:
    """How much audio the packets in a probe hold: the sum of their durations, nothing decoded (their
    timestamps are not used: FFmpeg derives Ogg's from the last page, which a probe does not hold)."""
    total = 0.0
    try:
        for packet in container.demux(stream):
            if packet.duration and packet.time_base:
                total += float(packet.duration * packet.time_base)
    except Exception:  # noqa: BLE001 - the probe ends mid-packet
        pass
    return total


def probe_all(s3: Any, bucket: str, objects: Iterable[AudioObject], threads: int = 8) -> None:
    """Fill in `seconds` / `exact` of each object (ranged GETs on a thread pool no wider than boto3's
    connection pool, 10)."""
    def probe(obj: AudioObject) -> None:
        try:
            head = s3.get_object(Bucket=bucket, Key=obj.key, Range=f"bytes=0-{PROBE_BYTES - 1}")["Body"].read()
            obj.seconds, obj.exact = probe_seconds(head, obj.size)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not read the start of s3://%s/%s: %s", bucket, obj.key, exc)
            obj.seconds, obj.exact = obj.size * 8 / ASSUMED_BITS_PER_SECOND, False

    todo = [o for o in objects if o.seconds is None]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            list(pool.map(probe, todo))
