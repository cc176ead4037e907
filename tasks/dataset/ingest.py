"""Ingest: list the products of a source tree, validate them, hash every input file.

```
SOURCE/
  products.csv             optional index: product_id, category, caption, prompt
  <product_id>/
    videos/*.mp4|mov|mkv|webm
    images/*.jpg|jpeg|png|webp
    meta.json              optional: {"category": ..., "caption": ..., "prompt": ...}
```

The source may be a local path or any fsspec URL. Ingest never fails on a bad product: it is
set aside with a reject row. It is not cached (it is what notices that the source changed); the
content hashes it records are what every later stage's cache key is made of.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

import fsspec
from prefect import task

from storage.hashing import sha256_file
from storage.layout import UnsafeNameError, check_safe_name, is_safe_name
from storage.rejects import reject_row

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
METADATA_FIELDS = ("category", "caption", "prompt")
STAGE = "ingest"


class IngestResult(TypedDict):
    products: list[dict]
    source_files: list[dict]
    rejects: list[dict]


def _read_index(fs, root: str, rejects: list[dict]) -> dict[str, dict]:
    """products.csv -> {product_id: metadata}; conflicting duplicate rows mark the id ambiguous."""
    path = posixpath.join(root, "products.csv")
    if not fs.exists(path):
        return {}
    text = fs.cat_file(path).decode("utf-8-sig", errors="replace")
    index: dict[str, dict] = {}
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        pid = (row.get("product_id") or "").strip()
        meta = {k: (row.get(k) or "").strip() for k in METADATA_FIELDS}
        if not pid:
            rejects.append(reject_row(STAGE, f"products.csv:{line}", "index_row_invalid", "row has no product_id"))
        elif pid in index and index[pid] != meta:
            index[pid]["conflict"] = f"products.csv lists {pid!r} more than once with different values (line {line})"
        else:
            index.setdefault(pid, meta)
    return index


def _list_files(fs, folder: str, extensions: set[str]) -> tuple[list[str], list[str]]:
    """(usable files, files with other extensions) in a folder, sorted by name."""
    if not fs.isdir(folder):
        return [], []
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    files = [n for n in names if fs.isfile(posixpath.join(folder, n))]
    usable = [n for n in files if posixpath.splitext(n)[1].lower() in extensions]
    return usable, [n for n in files if n not in usable]


def _metadata(fs, product_dir: str, pid: str, indexed: dict | None) -> dict:
    """Index row overlaid by meta.json; the prompt falls back to category, then caption."""
    meta = {k: "" for k in METADATA_FIELDS} | {k: v for k, v in (indexed or {}).items() if k in METADATA_FIELDS}
    meta_path = posixpath.join(product_dir, "meta.json")
    if fs.exists(meta_path):
        try:
            loaded = json.loads(fs.cat_file(meta_path).decode("utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"meta.json is not valid JSON metadata: {exc}") from exc
        meta |= {k: str(loaded[k]).strip() for k in METADATA_FIELDS if loaded.get(k) is not None}
    meta["category"] = meta["category"] or "unknown"
    meta["prompt"] = (
        meta["prompt"] or (meta["category"] if meta["category"] != "unknown" else "") or meta["caption"] or "product"
    )
    return meta


def ingest_source(source: str, min_images: int, hash_workers: int = 4) -> IngestResult:
    """List, validate and hash a source tree. Pure apart from reading the source. A product with
    fewer than `min_images` photos is rejected here (the product-images stage's `min_images`, so
    the two stages ask for the same number)."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        raise FileNotFoundError(f"source {source!r} is not a directory (local path or fsspec URL)")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def uri(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    rejects: list[dict] = []
    index = _read_index(fs, root, rejects)
    dirs = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))

    # Ids that collide once case is ignored would collide on many file systems and in people's heads.
    by_folded: dict[str, list[str]] = defaultdict(list)
    for name in dirs:
        by_folded[name.casefold()].append(name)

    products, files_to_hash = [], []
    for name in dirs:
        product_dir = posixpath.join(root, name)
        item = uri(product_dir)
        try:
            pid = check_safe_name(name, "product id")
        except UnsafeNameError as exc:
            rejects.append(reject_row(STAGE, item, "product_id_invalid", str(exc)))
            continue
        if len(by_folded[name.casefold()]) > 1:
            others = ", ".join(repr(n) for n in by_folded[name.casefold()] if n != name)
            rejects.append(
                reject_row(
                    STAGE,
                    item,
                    "product_id_duplicate",
                    f"id {pid!r} collides with {others} when case is ignored; rename one",
                    pid,
                )
            )
            continue
        indexed = index.get(pid)
        if indexed and "conflict" in indexed:
            rejects.append(reject_row(STAGE, item, "product_metadata_conflict", indexed["conflict"], pid))
            continue
        try:
            meta = _metadata(fs, product_dir, pid, indexed)
        except ValueError as exc:
            rejects.append(reject_row(STAGE, item, "product_metadata_invalid", str(exc), pid))
            continue
        videos, other_videos = _list_files(fs, posixpath.join(product_dir, "videos"), VIDEO_EXTENSIONS)
        images, other_images = _list_files(fs, posixpath.join(product_dir, "images"), IMAGE_EXTENSIONS)
        for sub, names in (("videos", other_videos), ("images", other_images)):
            for n in names:
                rejects.append(
                    reject_row(
                        STAGE,
                        uri(posixpath.join(product_dir, sub, n)),
                        "unsupported_extension",
                        f"{sub}/{n}: extension not one of "
                        f"{sorted(VIDEO_EXTENSIONS if sub == 'videos' else IMAGE_EXTENSIONS)}",
                        pid,
                    )
                )
        if not videos:
            rejects.append(reject_row(STAGE, item, "no_videos", "product has no video under videos/", pid))
            continue
        if len(images) < min_images:
            rejects.append(
                reject_row(
                    STAGE,
                    item,
                    "too_few_images",
                    f"product has {len(images)} photo(s) under images/, needs at least {min_images}",
                    pid,
                )
            )
            continue
        products.append({"product_id": pid, **meta, "num_videos": len(videos), "num_images": len(images)})
        files_to_hash += [(pid, "video", n, uri(posixpath.join(product_dir, "videos", n))) for n in videos]
        files_to_hash += [(pid, "image", n, uri(posixpath.join(product_dir, "images", n))) for n in images]

    for pid in sorted(set(index) - set(dirs)):
        rejects.append(
            reject_row(
                STAGE,
                f"products.csv:{pid}",
                "product_missing",
                f"products.csv lists {pid!r} but the source has no folder of that name",
                pid if is_safe_name(pid) else None,
            )
        )

    with ThreadPoolExecutor(hash_workers) as pool:  # hashlib releases the GIL on large reads
        digests = list(pool.map(lambda f: sha256_file(f[3]), files_to_hash))
    source_files = [
        {"product_id": pid, "role": role, "name": name, "uri": u, "size_bytes": size, "sha256": digest}
        for (pid, role, name, u), (digest, size) in zip(files_to_hash, digests)
    ]
    return {"products": products, "source_files": source_files, "rejects": rejects}


# Not cached on purpose: it is what reads the source; its hashes key every cached stage after it.
ingest_task = task(ingest_source, name="ingest", retries=2, retry_delay_seconds=5)
