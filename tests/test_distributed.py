"""Training on several ranks, with real torchrun processes on CPU (gloo): 2 ranks train the weights
1 rank trains on the same global batches (ddp and fsdp), checkpoints resume on another number of
ranks (2 FSDP ranks -> 1 process, 1 process -> 2 DDP ranks), MLflow hears from rank 0 only, and
the torchrun task streams the ranks' output and names the rank that died."""

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.train import precompute, train
from storage.tracking import tracking_uri
from tasks.training.distributed import rank_rows
from tasks.training.model_store import load_model_folder
from tasks.training.run_config import load_run_config
from tasks.training.torchrun import TorchrunError, run_torchrun
from tasks.training.train import TrainData, run_training
from tests.fixtures_dataset import TINY_CONFIG, tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # torchrun ranks get OMP_NUM_THREADS=1

# float32: 2 ranks add the partial sums of a batch in another order, and the weights of the two
# runs differ by ~1e-8. Dividing by each rank's own weight sum instead of the global one moves
# them by ~7e-4, so this tolerance tells a right implementation from a wrong one.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
TWO_RANKS = ("train.distributed.nproc_per_node=2",)
ONE_PROCESS = ("train.distributed.nproc_per_node=1", "train.distributed.strategy=ddp")


@pytest.fixture(scope="module")
def dataset(tiny_dataset, tiny_data_dir, local_mlflow):
    """The session's tiny dataset with its latents (precompute is cached: free when test_train ran).
    local_mlflow first: it points MLflow at the session's store before these runs do (later modules
    rely on the MLFLOW_TRACKING_URI it exports)."""
    precompute(config=str(TINY_CONFIG), overrides=[f"data.root={tiny_dataset}", f"mlflow.data_dir={tiny_data_dir}"])
    return tiny_dataset


@pytest.fixture(scope="module")
def run_overrides(dataset, tiny_data_dir):
    """Two steps per stage, a checkpoint every step, batches that do not split evenly over 2 ranks:
    stage 1 cuts micro-batches of 3 clips into 2 + 1; stage 2 accumulates a micro-batch of all clips
    but one and a micro-batch of one clip, where rank 1 has no clip and runs its zero-weight
    stand-in. Clipping at 0.05 is active, so FSDP's sharded gradient norm counts."""
    clips = len(TrainData.load(tiny_run_config(dataset, tiny_data_dir)).rows)
    assert clips >= 4, "the tiny dataset has too few train clips for these batches"
    return [
        f"data.root={dataset}",
        f"mlflow.data_dir={tiny_data_dir}",
        f"train.runs_dir={tiny_data_dir / 'runs'}",
        "train.stage1.max_steps=2",
        "train.stage1.batch_size=3",
        "train.stage2.epochs=2",
        "train.stage2.max_steps=2",
        f"train.stage2.batch_size={clips - 1}",
        "train.stage2.grad_accum=2",
        "train.checkpoint_every=1",
        "train.optimizer.max_grad_norm=0.05",
        "train.sample_every_epoch=0",
    ]


@pytest.fixture(scope="module")
def client(tiny_data_dir):
    uri = tracking_uri(tiny_data_dir)
    return MlflowClient(uri, uri)


@contextmanager
def task_log_lines():
    """The messages the Prefect task loggers emit inside the block (the suite logs at WARNING)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("prefect.task_runs"), Collect()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def one_rank(run_overrides):
    """The reference: one process, no process group."""
    return run_training(load_run_config(TINY_CONFIG, [*run_overrides, "train.run_name=one-rank"]))


@pytest.fixture(scope="module")
def ddp_run(run_overrides):
    """2 DDP ranks through the train flow (torchrun task), with the task's log lines."""
    with task_log_lines() as lines:
        result = train(config=str(TINY_CONFIG), overrides=[*run_overrides, *TWO_RANKS, "train.run_name=ddp-2"])
    return result, lines


# Samples too: the sampling pipeline runs the sharded model on every rank (EMA weights swapped in).
FSDP_RUN = ("train.distributed.strategy=fsdp", "train.sample_every_epoch=1", "train.run_name=fsdp-2")


@pytest.fixture(scope="module")
def fsdp_run(run_overrides):
    return train(config=str(TINY_CONFIG), overrides=[*run_overrides, *TWO_RANKS, *FSDP_RUN])


def assert_same_weights(folder, reference_folder):
    found, _ = load_model_folder(folder)
    expected, _ = load_model_folder(reference_folder)
    expected_weights = expected.state_dict()
    gate = "transformer.wan.blocks.0.attn1.processor.gate"
    assert expected_weights[gate].abs().sum() > 0  # the reference trained (the gates start at 0)
    for name, weight in found.state_dict().items():
        torch.testing.assert_close(weight, expected_weights[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def test_batch_rows_are_contiguous_near_equal_and_cover_the_batch():
    assert [rank_rows(3, rank, 2) for rank in range(2)] == [slice(0, 2), slice(2, 3)]
    assert [rank_rows(1, rank, 2) for rank in range(2)] == [slice(0, 1), slice(1, 1)]
    for count in range(9):
        parts = [list(range(count))[rank_rows(count, rank, 4)] for rank in range(4)]
        assert sum(parts, []) == list(range(count))  # in order, every row once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_the_number_of_ranks_is_not_part_of_the_run_but_must_fit_the_batch():
    one, two = (load_run_config(TINY_CONFIG, ["train.stage2.batch_size=2", *extra]) for extra in ((), TWO_RANKS))
    assert one.fingerprint() == two.fingerprint() and two.train.distributed.uses_torchrun
    with pytest.raises(ValueError, match="stage2.batch_size 1 is smaller than train.distributed.nproc_per_node 2"):
        load_run_config(TINY_CONFIG, TWO_RANKS)


def test_two_ddp_ranks_train_the_weights_of_one_rank_and_only_rank_0_logs(ddp_run, one_rank, client):
    result, lines = ddp_run
    assert result["global_step"] == one_rank["global_step"] == 4 and result["stage"] == 2
    assert_same_weights(result["model_dir"], one_rank["model_dir"])
    assert result["final_loss"] == pytest.approx(one_rank["final_loss"], rel=1e-5)
    # One MLflow run, one value per step: ranks other than 0 log nothing.
    assert [m.step for m in client.get_metric_history(result["run_id"], "loss")] == [1, 2, 3, 4]
    checkpoint = Path(result["run_dir"]) / "checkpoints" / "step-000004"
    assert {".metadata", "meta.json"} <= {p.name for p in checkpoint.iterdir()}  # DCP
    # The ranks' output reached the task's log, each line marked with its rank.
    assert any(line.startswith("[default0]:") and result["run_id"] in line for line in lines)
    assert any(line.startswith("[default1]:") for line in lines)


def test_two_fsdp_ranks_train_the_weights_of_one_rank(fsdp_run, one_rank, client):
    assert fsdp_run["global_step"] == 4
    assert_same_weights(fsdp_run["model_dir"], one_rank["model_dir"])
    logged = {entry.path for entry in client.list_artifacts(fsdp_run["run_id"], "samples")}
    assert {"samples/stage1-epoch001.mp4", "samples/stage2-epoch002.mp4"} <= logged


def stop_after(run_dir: Path, step: int) -> None:
    """Leave a finished run as a kill after its checkpoint of `step` would: no later checkpoint, no
    model folder, run.json still running."""
    for folder in (run_dir / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    shutil.rmtree(run_dir / "model")
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(
        json.dumps({k: v for k, v in record.items() if k != "result"} | {"status": "running"})
    )


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_rank(fsdp_run, one_rank, run_overrides):
    run_dir = Path(fsdp_run["run_dir"])
    checkpoint = run_dir / "checkpoints" / "step-000003"  # stage 2's first step: weights, Adam and EMA state
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in checkpoint.iterdir()}
    stop_after(run_dir, 3)
    resumed = run_training(load_run_config(TINY_CONFIG, [*run_overrides, *FSDP_RUN, *ONE_PROCESS]))
    assert (resumed["run_id"], resumed["resumed_from_step"], resumed["global_step"]) == (fsdp_run["run_id"], 3, 4)
    assert_same_weights(resumed["model_dir"], one_rank["model_dir"])


def test_a_checkpoint_of_one_process_resumes_on_two_ddp_ranks(one_rank, run_overrides):
    run = [*run_overrides, "train.run_name=one-then-two"]
    started = run_training(load_run_config(TINY_CONFIG, run))
    stop_after(Path(started["run_dir"]), 1)  # stage 1's first step: safetensors + state.pt
    resumed = train(config=str(TINY_CONFIG), overrides=[*run, *TWO_RANKS])
    assert (resumed["run_id"], resumed["resumed_from_step"], resumed["global_step"]) == (started["run_id"], 1, 4)
    assert_same_weights(resumed["model_dir"], one_rank["model_dir"])


@flow
def launch_failing_ranks():
    run_torchrun("tests.torchrun_rank_fails", [], 2)


def test_the_torchrun_task_streams_the_ranks_output_and_names_the_rank_that_died():
    started = time.monotonic()
    with task_log_lines() as lines, pytest.raises(TorchrunError) as failure:
        launch_failing_ranks()
    assert "rank 1 (local rank 1) failed with exit code 3" in str(failure.value)
    assert time.monotonic() - started < 60  # rank 0 would sleep 120 s: torchrun stopped it
    assert "[default0]:rank 0 of 2 started" in lines and "[default1]:rank 1 of 2 started" in lines
