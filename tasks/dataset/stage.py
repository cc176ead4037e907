"""What every stage shares: its result type, its errors, and the Prefect task around it.

A stage is a small pure function `item + config -> StageResult` (rows for its manifest, reject
rows for what it set aside). `stage_task` wraps it as a Prefect task whose cache key is made of
the content hashes in its inputs, its config and the stage's code version, so a re-run with
nothing changed does no work, and a changed option re-runs exactly the stages that read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from prefect import task
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from pydantic import BaseModel

from storage.errors import SystemicError
from storage.hashing import sha256_json
from storage.layout import DatasetRoot


class StageResult(TypedDict):
    """What a stage returns for one item; plain JSON so Prefect can persist it as the cache."""

    rows: list[dict]  # rows of the stage's manifest (storage/schemas.py)
    rejects: list[dict]  # storage.rejects.reject_row(...) rows


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def cache_key(stage: str, version: str, parameters: dict[str, Any]) -> str:
    """Key of one stage run: stage name + code version + inputs (which carry content hashes)."""
    return f"{stage}-{version}-" + sha256_json(_jsonable(parameters))


def cache_storage(root: DatasetRoot) -> LocalFileSystem:
    """Where stage results (the cache) live: under the dataset root, so deleting OUT resets it.
    Prefect wants result storage saved as a block; one block per root."""
    block = LocalFileSystem(basepath=str(root.cache_dir))
    block.save(f"stage-cache-{sha256_json(str(root.root))[:16]}", overwrite=True)
    return block


def _not_systemic(_task, _run, state) -> bool:
    """Retry transient failures; a systemic error would only fail again."""
    try:
        state.result()
    except SystemicError:
        return False
    except Exception:
        return True
    return True


def stage_task(name: str, version: str, retries: int = 2) -> Callable:
    """Decorator: a pure stage function -> a cached, retryable Prefect task.

    Bump `version` whenever the stage's outputs would change for the same inputs.
    """

    def decorate(fn: Callable) -> Callable:
        return task(
            fn,
            name=name,
            version=version,
            cache_key_fn=lambda _ctx, params: cache_key(name, version, params),
            retries=retries,
            retry_delay_seconds=2,
            retry_condition_fn=_not_systemic,
            persist_result=True,
            result_serializer="json",
            task_run_name=lambda: _run_name(name),
        )

    return decorate


def _run_name(stage: str) -> str:
    """`scenes: P001/front.mp4`-style names, so the Prefect UI says which item a run is."""
    ctx = TaskRunContext.get()
    params = ctx.parameters if ctx else {}
    for key in ("item", "clip", "product", "video"):
        item = params.get(key)
        if isinstance(item, dict):
            label = item.get("clip_key") or "/".join(str(item[k]) for k in ("product_id", "name") if k in item)
            if label:
                return f"{stage}: {label}"
    return stage
