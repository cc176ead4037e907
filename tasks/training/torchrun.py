"""Training through torchrun: the Prefect task that starts and watches it, and what each rank runs.

In the train flow's process, `train_with_torchrun(cfg, ...)` writes the resolved run config to a
temporary folder and runs the `torchrun` task:

    python -m torch.distributed.run --standalone --nproc-per-node N --tee 3 -m tasks.training.torchrun \\
        --config <folder>/run_config.yaml --result <folder>/result.json

The task streams every output line into its Prefect log as it comes (torchrun prefixes each with
`[default<local rank>]:`). When a rank dies, torchrun stops the others and prints which rank failed
first with what exit code; the task raises a TorchrunError saying so. Each rank runs `main`, that
is tasks/training/train.py's run_training (the one training loop; it joins the process group from
torchrun's environment), and rank 0 writes the result file the task returns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from torch.distributed.elastic.multiprocessing.errors import record

from storage.results import emit_result
from tasks.training.run_config import RunConfig, load_run_config
from tasks.training.train import run_training

ENTRY_MODULE = "tasks.training.torchrun"
REPO_ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 200  # output kept for the error message (torchrun's failure summary is at the end)
# torchrun's summary of a failed launch: the first rank that failed, with its exit code.
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):\s*\[0\]:(?P<block>.*?)(?:\n=+|\Z)", re.S)
RANK_FIELD = re.compile(r"rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local_rank>\d+)\)")
EXIT_FIELD = re.compile(r"exitcode\s*:\s*(?P<code>-?\d+)(?P<detail>[^\n]*)")


class TorchrunError(RuntimeError):
    """A torchrun launch failed; the message names the rank that failed first and its exit code."""


def torchrun_command(module: str, args: list[str], nproc_per_node: int, log_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "--tee=3",
        f"--log-dir={log_dir}",
        "-m",
        module,
        *args,
    ]


def rank_environment(environ: dict[str, str]) -> dict[str, str]:
    """The ranks' environment: this repository importable from any working directory, and
    unbuffered output, so that lines reach the log as they are printed."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    return environ | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def failure_message(exit_code: int, output: str) -> str:
    """What a failed launch says: the first failed rank and its exit code, from torchrun's summary;
    the end of the output when there is no summary (torchrun itself failed)."""
    cause = ROOT_CAUSE.search(output)
    rank, code = (RANK_FIELD.search(cause["block"]), EXIT_FIELD.search(cause["block"])) if cause else (None, None)
    if rank is None or code is None:
        return f"torchrun exited with code {exit_code}; its last output:\n{output[-4000:]}"
    return (
        f"rank {rank['rank']} (local rank {rank['local_rank']}) failed with exit code {code['code']}"
        f"{code['detail'].rstrip()}; torchrun stopped the other ranks. torchrun's report:\n"
        f"{cause['block'].strip()}"
    )


@task(name="torchrun")
def run_torchrun(module: str, args: list[str], nproc_per_node: int) -> None:
    """Run `python -m module *args` on nproc_per_node ranks of this host, each output line into
    this task's log as it comes; a TorchrunError when a rank fails."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as log_dir:
        command = torchrun_command(module, args, nproc_per_node, log_dir)
        logger.info("starting %d rank(s): %s", nproc_per_node, " ".join(command))
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=rank_environment(dict(os.environ)),
        ) as process:
            try:
                for line in process.stdout:
                    logger.info(line.rstrip("\n"))
                    tail.append(line)
            finally:
                if process.poll() is None:  # we were interrupted (flow cancelled): torchrun stops its ranks
                    process.terminate()
            exit_code = process.wait()
    if exit_code:
        raise TorchrunError(failure_message(exit_code, "".join(tail)))


def train_with_torchrun(cfg: RunConfig, resume: bool = True, init_from: str | None = None) -> dict:
    """tasks/training/train.py's run_training on train.distributed.nproc_per_node ranks; returns rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="train-torchrun-") as folder:
        config, result = Path(folder) / "run_config.yaml", Path(folder) / "result.json"
        config.write_text(cfg.to_yaml())
        args = ["--config", str(config), "--result", str(result)]
        args += ([] if resume else ["--no-resume"]) + ([] if init_from is None else ["--init-from", str(init_from)])
        run_torchrun(ENTRY_MODULE, args, cfg.train.distributed.nproc_per_node)
        return json.loads(result.read_text())


@record  # a rank's exception goes into torchrun's failure report
def main(argv: list[str] | None = None) -> None:
    """One rank of train_with_torchrun."""
    parser = argparse.ArgumentParser(
        description="One torchrun rank of the train flow (see tasks/training/torchrun.py)."
    )
    parser.add_argument("--config", required=True, help="resolved run config YAML")
    parser.add_argument("--result", required=True, help="rank 0 writes the training result here")
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--init-from", default=None)
    args = parser.parse_args(argv)
    result = run_training(load_run_config(args.config), resume=args.resume, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        emit_result(result, args.result)


if __name__ == "__main__":
    main()
