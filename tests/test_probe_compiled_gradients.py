"""The gradient probe of pytorch#193061 (benchmarks/probe_compiled_gradients.py) and the torch
versions that get the workaround (models.speed). The bug itself needs Triton on a GPU; here the
probe's per-tensor comparison is checked: one slightly wrong small tensor is found and named,
where the error of all gradients together stays under the tolerance."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from models import speed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = "transformer.wan.blocks.0.scale_shift_table"


@pytest.mark.parametrize(
    ("version", "needed"),
    [("2.9.1", False), ("2.10.0", True), ("2.11.0+cu130", True), ("2.13.0+cpu", True), ("2.10.0a0+git1234", True)],
)
def test_which_torch_versions_get_the_workaround(version, needed):
    assert speed.needs_mix_order_reduction_workaround(version) is needed


def test_the_workaround_is_a_per_call_compile_option():
    assert speed.training_compile_kwargs(True) == {"options": {"triton.mix_order_reduction": False}}
    assert speed.training_compile_kwargs(False) == {}
    assert speed.training_compile_kwargs() == speed.training_compile_kwargs(
        speed.needs_mix_order_reduction_workaround()
    )
    assert torch._inductor.config.triton.mix_order_reduction  # the global setting is left alone


def test_the_installed_torch_still_lacks_the_fix_if_the_gate_says_so():
    """pytorch#193103 writes the final reduce into the buffer (copy_) instead of rebinding its
    name; while the installed Inductor rebinds, the gate must ask for the workaround."""
    from torch._inductor.codegen.simd import SIMDScheduling

    source = inspect.getsource(SIMDScheduling._codegen_mix_order_reduction)
    rebinds = 'final_reduce = f"{buffer_name} = {ws_name}[' in source
    if rebinds:
        assert speed.needs_mix_order_reduction_workaround()


def test_one_wrong_small_tensor_is_found_where_all_gradients_hide_it():
    import benchmarks.bench_gpu as bench
    from benchmarks.probe_compiled_gradients import CORRUPT_FACTOR, DEFAULT_TOLERANCE, gradient_report, two_steps

    b = bench.Bench(use_tiny=True, frames=5, height=32, width=48, steps=3)
    eager = two_steps(b, 1)
    second = eager["gradients"][1]
    assert len(eager["gradients"]) == 2 and second.keys() == eager["weights_after_first"].keys()
    assert not all(torch.equal(second[n], eager["gradients"][0][n]) for n in second)  # the second step is its own
    corrupted = {name: g * CORRUPT_FACTOR if name == SMALL else g for name, g in second.items()}
    report = gradient_report(corrupted, second)
    assert report["worst"][0] == [SMALL, pytest.approx(CORRUPT_FACTOR - 1)]
    assert report["max_tensor_relative_error"] > DEFAULT_TOLERANCE > report["all_gradients_relative_error"]
    assert report["tensors"] == len(second) and sum(e > 0 for e in report["errors"].values()) == 1
    assert gradient_report(second, second)["max_tensor_relative_error"] == 0.0


@pytest.mark.slow
def test_the_probe_runs_tiny_on_the_cpu_and_names_a_corrupted_tensor(tmp_path, monkeypatch):
    """End to end on the CPU (Inductor's C++ backend): batch 1, the compiled training call with
    the workaround, two steps; everything agrees with eager but the tensor corrupted on purpose."""
    from benchmarks.probe_compiled_gradients import main

    monkeypatch.setenv("OUT", str(tmp_path))
    main(["--tiny", "--batches", "1", "--checkpointing", "selective", "--workaround", "on", "--corrupt", SMALL])
    result = json.loads((tmp_path / "probe_compiled_gradients.json").read_text())
    (case,) = result["cases"]
    assert (case["batch"], case["checkpointing"], case["mix_order_reduction_off"], case["agrees"]) == (
        1,
        "selective",
        True,
        False,
    )
    for step in case["steps"]:
        assert step["worst"][0][0] == SMALL and step["tensors_over_tolerance"] == 1
        assert step["all_gradients_relative_error"] < result["summary"]["tolerance"]
        assert step["worst"][1][1] < 1e-3 and step["loss_relative_error"] < 1e-5  # the rest: eager's gradients
    assert result["summary"]["all_agree_with_workaround"] is False
