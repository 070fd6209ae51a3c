"""Whether a sync's tar stream travels gzip-compressed, and the compressing writer.

Decided once per transfer, before the first byte: compression pays when most of
the stream compresses.  A tar stream of small source files is mostly text and
header padding (37 MB of stream for 19 MB of 2.5 kB files; zlib level 1 makes
it 4.2 MB for 0.2 CPU-s, and the receiver's ``gzip -d`` 0.13 s), while a
checkpoint or an archive does not compress at all and would only cost CPU on
both ends.  So:

* a file whose name says it is already compressed (:data:`COMPRESSED_SUFFIXES`:
  ``.npz``, ``.png``, ``.keras``, ``.gz``, ``.zip``, ...) counts as incompressible;
* a big file (:data:`SAMPLE_FROM_BYTES` or more) counts by a sample: its first
  :data:`SAMPLE_BYTES` compressed at level 1 (the largest :data:`MAX_SAMPLES`
  files are sampled; a big file beyond those counts as incompressible);
* small files and the tar headers count as compressible.

The stream is compressed (gzip, zlib level 1: the fastest level, which keeps
the sender ahead of any real link) when the incompressible part is under half
of it, and only when the destination has ``gzip`` (its GNU tar runs ``tar -xz``);
the remote side needs nothing but ``gzip``, present on every Linux image.
Never to a destination on this machine (a loopback address: the sandbox's
sshd): there is no link to save, and compressing costs both ends CPU (measured:
10,000 small files, 1.41 CPU-s for the whole sync uncompressed, 1.67 compressed).
"""

from __future__ import annotations

import ipaddress
import os
import zlib
from collections.abc import Sequence
from typing import Any

from gpuflow.sync.ignore import LocalEntry

COMPRESSED_SUFFIXES = frozenset(
    {
        # archives and compressed streams
        ".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".7z", ".rar", ".whl", ".jar", ".br",
        # numpy / keras / checkpoints stored in zip or binary float containers
        ".npz", ".keras", ".h5", ".hdf5", ".pt", ".pth", ".ckpt", ".safetensors", ".onnx", ".tflite", ".pb",
        # images, audio, video, documents that are compressed inside
        ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".heic", ".mp3", ".mp4", ".m4a", ".ogg", ".flac",
        ".mkv", ".mov", ".avi", ".webm", ".pdf", ".docx", ".xlsx", ".pptx", ".parquet", ".orc", ".tfrecord",
    }
)
HEADER_BYTES = 1536  # a member's headers (pax mtime record + ustar) and padding, roughly
SAMPLE_FROM_BYTES = 1 << 20
SAMPLE_BYTES = 1 << 16
MAX_SAMPLES = 32
COMPRESSIBLE_RATIO = 0.8  # a sample that shrinks below this fraction compresses
LEVEL = 1


def _suffix(path: str) -> str:
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _sample_compresses(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            sample = handle.read(SAMPLE_BYTES)
    except OSError:
        return False
    return bool(sample) and len(zlib.compress(sample, LEVEL)) < COMPRESSIBLE_RATIO * len(sample)


def on_this_machine(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): no network link in between."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def worth_compressing(source: str | os.PathLike[str], entries: Sequence[LocalEntry]) -> bool:
    """Whether the tar stream of ``entries`` should travel compressed (see the module's rules)."""
    base = os.fspath(source) + os.sep
    stream = 0
    incompressible = 0
    big: list[LocalEntry] = []
    for entry in entries:
        stream += entry.size + HEADER_BYTES
        if entry.kind != "file" or not entry.size:
            continue
        if _suffix(entry.path) in COMPRESSED_SUFFIXES:
            incompressible += entry.size
        elif entry.size >= SAMPLE_FROM_BYTES:
            big.append(entry)
    big.sort(key=lambda entry: entry.size, reverse=True)
    for index, entry in enumerate(big):
        if index >= MAX_SAMPLES or not _sample_compresses(base + entry.path):
            incompressible += entry.size
    return stream > 0 and incompressible * 2 < stream


class GzipWriter:
    """A file-like sink that gzip-compresses (level :data:`LEVEL`) what it is
    given into ``sink``; :meth:`close` writes the gzip trailer (the sink stays open)."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
        self.wire_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        out = self._compressor.compress(data)
        if out:
            self._sink.write(out)
            self.wire_bytes += len(out)
        return len(data)

    def close(self) -> None:
        out = self._compressor.flush()
        self._sink.write(out)
        self.wire_bytes += len(out)
