"""The README's deployment path for real: `prefect server start`, a process worker,
`prefect deploy` from prefect.yaml, `prefect deployment run build-dataset/demo`; then the Prefect
UI in headless Chromium shows the finished run and its summary artifact."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from demo.studio import StudioConfig, generate_studio
from tasks.dataset.build_config import load_build_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.server, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PYTHONPATH": str(REPO),
    }
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_until(healthy, 120, "prefect server")
        yield env, port
    finally:
        _stop(server)


def _stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then the whole process group killed if it has not exited after grace_s (a worker
    on a loaded 2-core machine has taken longer than 30 s to shut down)."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


def _prefect(env, *args, timeout=180) -> str:
    out = subprocess.run([BIN / "prefect", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_deployment_run_on_a_real_server_and_ui(prefect_server, tmp_path):
    env, port = prefect_server
    source, output = tmp_path / "source", tmp_path / "dataset"
    generate_studio(source, tmp_path / "truth", StudioConfig.tiny(num_products=3))

    for pool in ("local-process", "gpu-process"):  # every pool prefect.yaml names
        _prefect(env, "work-pool", "create", pool, "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--name", "build-dataset/demo")
    worker = subprocess.Popen(
        [BIN / "prefect", "worker", "start", "--pool", "local-process"],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # The deployment names configs/dataset/demo.yaml; a run adds overrides for the tiny sources.
        overrides = '["scenes.min_short_side=null", "scenes.height=96", "scenes.width=144"]'
        params = ["--param", f"source={source}", "--param", f"output={output}", "--param", f"overrides={overrides}"]
        printed = _prefect(env, "deployment", "run", "build-dataset/demo", *params)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", printed).group(1)

        def finished():
            state = httpx.get(f"http://127.0.0.1:{port}/api/flow_runs/{run_id}").json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait_until(finished, 420, "the flow run to finish")
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        _stop(worker)
    assert (output / "dataset.json").exists()
    recorded = load_build_config(output / "build.yaml")  # the deployment's config with the run's overrides
    assert (recorded.name, recorded.segmentation.backend, recorded.scenes.height) == ("demo", "classic", 96)
    artifacts = httpx.post(
        f"http://127.0.0.1:{port}/api/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    ).json()
    assert {"build-dataset-summary", "build-dataset-progress"} <= {a["key"] for a in artifacts}

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: the UI half of this test needs it (.ci/run installs it)")
    summary = next(a for a in artifacts if a["key"] == "build-dataset-summary")
    for url, expected in (
        (f"http://127.0.0.1:{port}/runs/flow-run/{run_id}", "build-dataset"),
        (f"http://127.0.0.1:{port}/artifacts/artifact/{summary['id']}", "rejects"),
    ):
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert expected in dom, f"{url} did not show {expected!r}"
