"""The dataset root (OUT): where every file of a built dataset lives, written atomically.

```
OUT/
  video_clips/{clip_key}.mp4
  masks/{clip_key}/{frame:05d}.png
  masked_videos/{clip_key}.mp4
  product_images/{product_id}/{view}.png
  manifests/{name}.parquet
  dataset.json
  build.yaml                   the build config (configs/dataset/*.yaml, resolved) of the last build
  .cache/                      Prefect task results (the stage cache); safe to delete
```

build.yaml is written when a build starts, before any stage runs: the files under the root are
that config's. `manifests/dataset.parquet`, written last, marks that a build finished. The next
build of the root takes build.yaml as its config unless given another
(tasks/dataset/build_config.py).

A file appears under its final name only once it is complete (write to a temporary sibling, then
`os.replace`), so a killed run never leaves something a re-run would take for finished work.
Every path is resolved and checked to stay under the root: odd ids cannot write elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from storage.config_files import read_mapping
from storage.schemas import MANIFESTS, to_table

# Product ids and view names become file names: ASCII letters, digits, '.', '_', '-', no '..'.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeNameError(ValueError):
    pass


def is_safe_name(name: str) -> bool:
    return bool(SAFE_NAME.match(name)) and ".." not in name


def check_safe_name(name: str, what: str = "name") -> str:
    if not is_safe_name(name):
        raise UnsafeNameError(
            f"{what} {name!r} is not usable as a file name: use ASCII letters, digits, '.', '_' "
            "and '-' (starting with a letter or digit, no '..', at most 128 characters)"
        )
    return name


def _public_mode(path: str | Path, base: int) -> None:
    """mkstemp/mkdtemp create owner-only entries; give finished outputs the usual umask mode so
    a training job running as another user can read them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, base & ~umask)


def clip_key(product_id: str, clip_id: str) -> str:
    return f"{product_id}_{clip_id}"


@dataclass(frozen=True)
class DatasetRoot:
    root: Path

    @classmethod
    def create(cls, path: str | os.PathLike) -> DatasetRoot:
        """Make the root and check that it is writable; a systemic error says what to do."""
        root = Path(path).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"output {str(root)!r} is not writable ({exc.strerror or exc}); "
                "choose another `output` or fix its permissions"
            ) from exc
        return cls(root)

    # -- paths (relative to the root, as manifests store them) ---------------------------------
    @staticmethod
    def clip_video_rel(key: str) -> str:
        return f"video_clips/{key}.mp4"

    @staticmethod
    def mask_dir_rel(key: str) -> str:
        return f"masks/{key}/"

    @staticmethod
    def masked_video_rel(key: str) -> str:
        return f"masked_videos/{key}.mp4"

    @staticmethod
    def product_image_rel(product_id: str, view: str) -> str:
        return f"product_images/{product_id}/{view}.png"

    @staticmethod
    def manifest_rel(name: str) -> str:
        return f"manifests/{name}.parquet"

    build_config_rel = "build.yaml"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def path(self, rel: str) -> Path:
        """Absolute path of `rel`, refused if it would land outside the root."""
        resolved = (self.root / rel).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UnsafeNameError(f"{rel!r} resolves outside the output root {str(self.root)!r}")
        return resolved

    # -- atomic writes ------------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_file(self, rel: str) -> Iterator[Path]:
        """Yield a temporary path next to `rel`; it becomes `rel` only if the block succeeds."""
        final = self.path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.stem}-", suffix=final.suffix, dir=final.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            _public_mode(tmp, 0o666)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @contextlib.contextmanager
    def atomic_dir(self, rel: str) -> Iterator[Path]:
        """Yield a temporary directory; it replaces directory `rel` only if the block succeeds."""
        final = self.path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            yield tmp
            _public_mode(tmp, 0o777)
            if final.exists():  # a finished older version: swap it out, then drop it
                old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_json(self, rel: str, obj: object) -> None:
        with self.atomic_file(rel) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # -- manifests ----------------------------------------------------------------------------
    def write_manifest(self, name: str, rows: list[dict]) -> pa.Table:
        table = to_table(name, rows)
        with self.atomic_file(self.manifest_rel(name)) as tmp:
            pq.write_table(table, tmp)
        return table

    def read_manifest(self, name: str) -> pa.Table:
        path = self.path(self.manifest_rel(name))
        if not path.exists():
            raise FileNotFoundError(f"manifest {name!r} not found at {path}: run build-dataset first")
        return pq.read_table(path, schema=MANIFESTS[name])

    def has_manifest(self, name: str) -> bool:
        return self.path(self.manifest_rel(name)).exists()

    # -- the build config ---------------------------------------------------------------------
    def read_build_config(self) -> dict | None:
        """The recorded build config (build.yaml) as a mapping; None when the root records none."""
        path = self.path(self.build_config_rel)
        return read_mapping(path, "build config", "written by build-dataset") if path.is_file() else None

    def write_build_config(self, tree: dict) -> None:
        header = (
            "# build-dataset's config of this dataset root, recorded when its last build started.\n"
            "# The next build of this root uses it unless given --config; retrain refreshes with it.\n"
        )
        with self.atomic_file(self.build_config_rel) as tmp:
            tmp.write_text(header + yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
