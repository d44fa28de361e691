"""bench/run.py's --gpu suite, built on the CPU: the cases, providers and target rules run here so
that a GPU session finds them working (the timings themselves need a GPU)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wf_bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small(bench, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES_KM", [(256, 64), (384, 96)])
    monkeypatch.setattr(bench, "BATCHES", [1, 3])
    monkeypatch.setattr(bench, "GPU_TOKENS", 5)
    return replace(
        bench.Settings(quick=True, budget_s=0.01, warmup_s=0.0, min_reps=2, max_reps=3, probe_reps=1), device="cpu"
    )


@pytest.mark.parametrize("kernel", ["act_quant_int8", "rmsnorm_act_quant", "ternary_quant", "i2s_matmul"])
def test_gpu_cases_build_and_time_on_the_cpu(bench, small, kernel, monkeypatch):
    monkeypatch.setattr(bench, "probe_bandwidth", lambda s: 1e10)  # the real probe reads 256 MiB
    cases = list(bench.GPU_REGISTRY[kernel](small))
    assert cases
    for case in cases:
        assert case.baseline in case.providers and "wrinklefree" in case.providers
        rows = bench.run_case(case, small, int8_peak=1e12)
        ours = next(r for r in rows if r["provider"] == "wrinklefree")
        assert ours["median_ms"] > 0 and ours["ratio"] > 0
        if case.memory_bound:
            assert ours["pct_read_bw"] > 0
    if kernel == "i2s_matmul":  # ours and the bf16 baseline compute the same product
        case = cases[-1]
        q, x_scale, packed, m = case.providers["wrinklefree"].args
        ref = bench.reference.i2s_matmul(q, x_scale, packed, m)
        assert torch.equal(bench.ops.i2s_matmul(q, x_scale, packed, m), ref)


def row(kernel, provider, shape, **kw):
    base = {"kernel": kernel, "provider": provider, "shape": shape, "device": "cuda", "ratio": None}
    return {**base, "median_ms": 1.0, "pct_read_bw": None, **kw}


def test_gpu_targets(bench):
    rows = [
        row("act_quant_int8", "wrinklefree", {"N": 8192, "K": 2560}, pct_read_bw=85.0, bytes=1 << 26),
        row("ternary_quant", "wrinklefree", {"K": 2560, "M": 640}, pct_read_bw=70.0, bytes=1 << 26),
        row("i2s_matmul", "wrinklefree", {"N": 1, "K": 2560, "M": 2560}, ratio=3.5, pct_read_bw=60.0),
        row("i2s_matmul", "wrinklefree", {"N": 128, "K": 2560, "M": 2560}, ratio=1.2),
        row("act_quant_int8", "onebitllms", {"N": 8192, "K": 2560}, median_ms=2.5),
    ]
    got = {(t["target"], t["kernel"]): t for t in bench.evaluate_targets(rows)}
    assert got[("quant bandwidth (HBM)", "act_quant_int8")]["met"] is True
    assert got[("quant bandwidth (HBM)", "ternary_quant")]["met"] is False
    assert got[("decode GEMV vs cuBLAS", "i2s_matmul")]["met"] is True
    assert got[("prefill GEMM vs cuBLAS", "i2s_matmul")]["met"] is None
    assert got[("vs onebitllms", "act_quant_int8")]["value"] == 2.5


def test_gpu_flag_needs_a_gpu(bench):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the flag runs")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--gpu", "--quick"])


def test_core_matmul_timer_runs_the_kernel_on_each_copy(bench, small, monkeypatch):
    # the C++-timed provider: one time per call, and the rotated copies all give the op's product
    monkeypatch.setattr(bench, "probe_bandwidth", lambda s: 1e10)
    case = next(c for c in bench.REGISTRY["i2s_matmul"](small) if c.shape["N"] == 3)
    core = case.providers["wrinklefree_core"]
    sets, _ = bench.rotated_args(core)
    assert len(sets) > 1
    q, x_scale, packed, m, out = core.args
    times = core.timer(sets, 5)
    assert len(times) == 5 and all(t > 0 for t in times)
    want = bench.ops.i2s_matmul(q, x_scale, packed, m)
    assert torch.equal(out, want)
    out.zero_()
    core.fn(*sets[1])
    assert torch.equal(out, want)
    rows = bench.run_case(case, small, int8_peak=1e12)
    assert next(r for r in rows if r["provider"] == "wrinklefree_core")["median_ms"] > 0
