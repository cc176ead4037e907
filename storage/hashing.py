"""Content hashes: what cache keys and manifests identify inputs and outputs by."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import fsspec

CHUNK = 1 << 20


def sha256_file(uri: str | Path) -> tuple[str, int]:
    """(hex digest, size in bytes) of a local path or fsspec URI, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with fsspec.open(str(uri), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_files(paths: Iterable[Path]) -> str:
    """One digest over several files, in the order given (e.g. the mask PNGs of a clip)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """Digest of a JSON-able object with sorted keys: stable across runs and processes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
