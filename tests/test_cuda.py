"""The CUDA core ``wrinklefree._C_cuda`` and the ops' CUDA kernels.

Three groups: checks that run everywhere (the build produced the module, it imports without a GPU,
its argument checks and error paths), nvcc compiles of the kernel source for sm_80 and sm_90, and
GPU tests (``-m cuda``) that compare the kernel with :mod:`wrinklefree.ops.reference` bit for bit.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from wrinklefree import ops
from wrinklefree.ops import _backend, quant, reference

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SRC = ROOT / "csrc" / "cuda" / "act_quant.cu"
NVCC = shutil.which("nvcc")
HAS_GPU = torch.cuda.is_available()

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _module_present() -> bool:
    return importlib.util.find_spec("wrinklefree._C_cuda") is not None


@pytest.fixture(scope="module")
def core():
    if not _module_present():
        pytest.skip("wrinklefree._C_cuda was not built (no nvcc at build time, or WF_CUDA=off)")
    return importlib.import_module("wrinklefree._C_cuda")


# ---- everywhere -------------------------------------------------------------------------------


def test_build_produced_cuda_module():
    if NVCC is None:
        pytest.skip("nvcc is not on PATH, so WF_CUDA=auto builds no CUDA module")
    if not _module_present():
        if os.environ.get("WF_CUDA") == "off":
            pytest.skip("WF_CUDA=off: the CUDA module is not built on purpose")
        pytest.fail(
            "nvcc is on PATH but wrinklefree._C_cuda is absent: the CUDA build failed or ran before nvcc was "
            "installed; rebuild with `pip install --no-build-isolation -e .` (or set WF_CUDA=off)"
        )
    # Importing must work without a GPU or driver: cudart is static and only the first launch
    # talks to the driver.
    mod = importlib.import_module("wrinklefree._C_cuda")
    for name in ("act_quant_int8", "device_count", "runtime_status", "driver_version"):
        assert callable(getattr(mod, name)), name
    assert mod.cuda_runtime_version >= 11000
    assert mod.device_count() >= 0
    assert isinstance(mod.runtime_status(), str)


def test_cuda_core_is_cached_and_matches_module():
    first = _backend.cuda_core()
    assert _backend.cuda_core() is first
    if _module_present() and not HAS_GPU:
        assert first is importlib.import_module("wrinklefree._C_cuda")


def test_op_has_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("wrinklefree::act_quant_int8", "CUDA")


@pytest.mark.parametrize(
    "args, match",
    [
        ((0x1000, 3, 2, 3, 0x2000, 0x3000, 0, 0), "dtype code"),
        ((0x1000, -1, 2, 3, 0x2000, 0x3000, 0, 0), "dtype code"),
        ((0x1000, 0, 0, 3, 0x2000, 0x3000, 0, 0), r"x\.shape\[0\]"),
        ((0x1000, 0, 2, 0, 0x2000, 0x3000, 0, 0), r"x\.shape\[1\]"),
        ((0, 0, 2, 3, 0x2000, 0x3000, 0, 0), "x must be a device address"),
        ((0x1000, 0, 2, 3, 0, 0x3000, 0, 0), "q must be a device address"),
        ((0x1000, 0, 2, 3, 0x2000, 0, 0, 0), "scale must be a device address"),
        ((0x1000, 0, 2, 3, 0x2000, 0x3000, -1, 0), "device"),
        ((0x1000, 0, 2**40, 2**40, 0x2000, 0x3000, 0, 0), "overflow"),
    ],
)
def test_core_rejects_bad_arguments(core, args, match):
    # Checked before any CUDA call, so these run without a GPU.
    with pytest.raises(ValueError, match=match):
        core.act_quant_int8(*args)


def test_core_launch_without_device_raises(core):
    if core.device_count() > 0:
        pytest.skip("a CUDA device is usable here; this checks the error path without one")
    with pytest.raises(RuntimeError, match=r"act_quant_int8: .*cuda(Error|GetDevice)") as info:
        core.act_quant_int8(0x1000, 0, 2, 3, 0x2000, 0x3000, 0, 0)
    assert core.runtime_status() != "cudaSuccess"
    assert "driver supports" in str(info.value)


# ---- nvcc -------------------------------------------------------------------------------------


def _nvcc(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=tmp_path)
    return proc, time.monotonic() - start


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_kernel(tmp_path, arch):
    out = tmp_path / f"act_quant_{arch}.o"
    proc, _ = _nvcc(tmp_path, "-c", f"-arch={arch}", "-std=c++17", str(KERNEL_SRC), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


@needs_nvcc
def test_kernel_ptx_uses_exact_float_ops(tmp_path):
    # Bit-exactness needs IEEE division, single-rounding multiplies and round-half-even; this
    # catches a rewrite into `*` and `/` under fast-math flags or an approximate reciprocal.
    ptx = tmp_path / "act_quant.ptx"
    proc, _ = _nvcc(tmp_path, "-ptx", "-arch=sm_90", "-std=c++17", str(KERNEL_SRC), "-o", str(ptx))
    assert proc.returncode == 0, proc.stderr
    text = ptx.read_text()
    assert "div.rn.f32" in text
    assert "mul.rn.f32" in text
    assert "cvt.rni.f32.f32" in text
    for bad in ("div.approx", "div.full", "rcp.approx", ".ftz.", "fma.rn.f32"):
        assert bad not in text, bad


# ---- GPU --------------------------------------------------------------------------------------


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, scale = (t.cpu() for t in got)
    q_ref, scale_ref = (t.cpu() for t in want)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == q_ref.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale.view(torch.int32), scale_ref.view(torch.int32)), "scale differs"
    bad = (q != q_ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} q values differ, first at {tuple(bad[0].tolist())}"


def _awkward(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (none overflowing float16), a zero row, a row below the floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    x *= torch.pow(10.0, torch.empty(n, 1, dtype=torch.float64).uniform_(-4, 3, generator=g))
    if n > 1:
        x[1] = 0.0
    if n > 2:
        x[2] *= 1e-7 / x[2].abs().max().clamp(min=1e-30)
    return x.to(dtype)


@pytest.fixture
def native_core():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    mod = _backend.cuda_core()
    if mod is None:
        pytest.skip("wrinklefree._C_cuda is not built or cannot use this GPU (see the warning)")
    return mod


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 7, 300, 2560, 6913])
@pytest.mark.parametrize("n", [1, 3, 17, 128])
def test_act_quant_matches_reference(native_core, n, k, dtype):
    x = _awkward(n, k, dtype, seed=n * 100_003 + k)
    got = ops.act_quant_int8(x.cuda())
    _assert_same(got, reference.act_quant_int8(x))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_act_quant_rounds_half_to_even(native_core, dtype):
    # 127 in every row makes the scale exactly 1, so x * scale lands on the .5 ties.
    halves = torch.arange(-254, 255, dtype=torch.float32) / 2  # -127, -126.5, ..., 127
    x = halves.repeat(5, 1)
    x[:, 0] = 127.0
    q, scale = ops.act_quant_int8(x.to(dtype).cuda())
    assert torch.all(scale.cpu() == 1.0)
    assert torch.equal(q.cpu()[0, 1:], torch.round(halves[1:]).to(torch.int8))
    _assert_same((q, scale), reference.act_quant_int8(x.to(dtype)))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("offset", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_act_quant_unaligned_input(native_core, offset, dtype):
    # A view into a larger buffer: x is not 16-byte aligned, q (fresh) is.
    n, k = 9, 1030
    flat = _awkward(1, n * k + offset, dtype, seed=offset).reshape(-1).cuda()
    x = flat[offset:].view(n, k)
    assert x.is_contiguous() and x.storage_offset() == offset
    _assert_same(ops.act_quant_int8(x), reference.act_quant_int8(x.cpu()))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("offset", [1, 3, 4])
@pytest.mark.parametrize("k", [5, 300, 2560, 4099])
def test_core_equally_misaligned_x_and_q(native_core, offset, k):
    # x and q misaligned by the same number of elements take the vector path with a scalar head.
    n = 6
    x_buf = _awkward(1, n * k + offset, torch.bfloat16, seed=k + offset).reshape(-1).cuda()
    q_buf = torch.empty(n * k + offset, dtype=torch.int8, device="cuda")
    scale = torch.empty(n, dtype=torch.float32, device="cuda")
    x, q = x_buf[offset:], q_buf[offset:]
    native_core.act_quant_int8(
        x.data_ptr(), 1, n, k, q.data_ptr(), scale.data_ptr(), x.device.index, torch.cuda.current_stream().cuda_stream
    )
    _assert_same((q.view(n, k), scale), reference.act_quant_int8(x.view(n, k).cpu()))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n, k", [(600_000, 1), (70_000, 600)])
def test_act_quant_more_rows_than_blocks(native_core, n, k):
    # Past 65536 blocks the kernels loop over rows (warp-per-row path, then block-per-row path).
    x = _awkward(n, k, torch.float32, seed=n + k).cuda()
    _assert_same(ops.act_quant_int8(x), reference.act_quant_int8(x.cpu()))


@pytest.mark.cuda
@needs_gpu
def test_act_quant_nonfinite_like_cpu_core(native_core):
    # NaN/inf are outside the reference's contract (torch propagates NaN); the CUDA kernel follows
    # the CPU core: NaN is skipped in the absmax and quantizes to -128.
    x = torch.tensor(
        [[1.0, float("nan"), -2.0, 0.5], [float("inf"), 1.0, -1.0, 0.0], [float("nan")] * 4],
        dtype=torch.float32,
    )
    _assert_same(ops.act_quant_int8(x.cuda()), ops.act_quant_int8(x))


@pytest.mark.cuda
@needs_gpu
def test_act_quant_on_side_stream(native_core):
    x = _awkward(64, 2560, torch.bfloat16, seed=7)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        xd = x.to("cuda", non_blocking=False) * 1  # produced on the side stream
        q, scale = ops.act_quant_int8(xd)
    side.synchronize()
    _assert_same((q, scale), reference.act_quant_int8(x))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8])
def test_act_quant_bad_dtype_raises(native_core, dtype):
    x = torch.ones(4, 8, dtype=dtype, device="cuda")
    with pytest.raises(TypeError, match="act_quant_int8: x must have dtype"):
        ops.act_quant_int8(x)


@pytest.mark.cuda
@needs_gpu
def test_act_quant_non_contiguous_raises(native_core):
    x = torch.ones(8, 4, device="cuda").t()
    with pytest.raises(ValueError, match="contiguous"):
        ops.act_quant_int8(x)


@pytest.mark.cuda
@needs_gpu
def test_reference_backend_and_fallback_agree(native_core, monkeypatch):
    x = _awkward(17, 300, torch.float16, seed=3).cuda()
    native = ops.act_quant_int8(x)
    monkeypatch.setattr(quant, "cuda_core", lambda: None)  # as if built without CUDA
    _assert_same(ops.act_quant_int8(x), native)
    monkeypatch.undo()
    ops.set_backend("reference")
    try:
        _assert_same(ops.act_quant_int8(x), native)
    finally:
        ops.set_backend("native")


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
def test_act_quant_2_pow_31_rows(native_core):
    # Row indices past int32: every product row * K must be 64-bit in the kernel.
    n = 2**31 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory")
    x = torch.randn(n, 1, dtype=torch.bfloat16, device="cuda")
    q, scale = ops.act_quant_int8(x)
    chunk = 2**27
    for i in range(0, n, chunk):
        # On the GPU the reference uses the same IEEE float32 ops as on the CPU.
        want = reference.act_quant_int8(x[i : i + chunk])
        assert torch.equal(q[i : i + chunk], want[0])
        assert torch.equal(scale[i : i + chunk].view(torch.int32), want[1].view(torch.int32))
