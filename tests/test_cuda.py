"""The CUDA core ``wrinklefree._C_cuda`` and the ops' CUDA kernels.

Three groups: checks that run everywhere (the build produced the module, it imports without a GPU,
its argument checks and error paths), nvcc compiles of every kernel source for sm_80 and sm_90 (and
PTX checks that the float steps are the exact IEEE ones), and GPU tests (``-m cuda``) that compare
the kernels with :mod:`wrinklefree.ops.reference` bit for bit: act_quant_int8, i2s_matmul (decode
GEMV and prefill GEMM), bitlinear_infer, ternary_quant and a packed BitLinear.
"""

from __future__ import annotations

import contextlib
import copy
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
from wrinklefree.nn import BitLinear
from wrinklefree.ops import _backend, i2s, quant, reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SRC = CUDA_DIR / "act_quant.cu"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
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
    for name in (
        "act_quant_int8",
        "i2s_matmul",
        "ternary_quant",
        "ternary_quant_workspace",
        "device_count",
        "runtime_status",
        "driver_version",
    ):
        assert callable(getattr(mod, name)), name
    assert mod.cuda_runtime_version >= 11000
    assert mod.device_count() >= 0
    assert isinstance(mod.runtime_status(), str)


def test_cuda_core_is_cached_and_matches_module():
    first = _backend.cuda_core()
    assert _backend.cuda_core() is first
    if _module_present() and not HAS_GPU:
        assert first is importlib.import_module("wrinklefree._C_cuda")


@pytest.mark.parametrize("op", ["act_quant_int8", "i2s_matmul", "bitlinear_infer"])
def test_op_has_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wrinklefree::{op}", "CUDA")


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


# Valid-looking arguments: q, x_scale, N, K, packed, packed_nbytes, M, out, device, stream.
_I2S_OK = (0x1000, 0x2000, 2, 128, 0x3000, 3 * 32 + 32, 3, 0x4000, 0, 0)


def _i2s_args(**changes):
    names = ("q", "x_scale", "N", "K", "packed", "packed_nbytes", "M", "out", "device", "stream")
    args = dict(zip(names, _I2S_OK, strict=True))
    args.update(changes)
    return tuple(args[n] for n in names)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"N": 0}, r"q\.shape\[0\] must be > 0"),
        ({"K": 0}, "K must be > 0"),
        ({"M": 0}, "out_features must be > 0"),
        ({"K": 100, "packed_nbytes": 3 * 25 + 32}, "not a multiple of 128"),
        ({"K": 2**24, "packed_nbytes": 3 * 2**22 + 32}, "int32 accumulators"),
        ({"packed_nbytes": 127}, r"packed holds 127 bytes.*needs M\*K/4 \+ 32 = 128"),
        ({"q": 0}, "q must be a device address"),
        ({"x_scale": 0}, "x_scale must be a device address"),
        ({"packed": 0}, "packed must be a device address"),
        ({"out": 0}, "out must be a device address"),
        ({"device": -1}, "device must be >= 0"),
        ({"N": 2**62}, r"N \* K elements overflow"),
        ({"M": 2**60}, r"M \* K / 4 \+ 32 bytes overflow"),
        ({"N": 2**40, "M": 2**30, "packed_nbytes": 2**35 + 32}, r"N \* M outputs overflow"),
    ],
)
def test_core_i2s_matmul_rejects_bad_arguments(core, changes, match):
    # Checked before any CUDA call, so these run without a GPU (and never touch the fake addresses).
    with pytest.raises(ValueError, match=f"i2s_matmul: .*{match}"):
        core.i2s_matmul(*_i2s_args(**changes))


# w, dtype, n, codes, scale, workspace, workspace_len, device, stream
_TQ_OK = (0x1000, 0, 5000, 0x2000, 0x3000, 0x4000, 6, 0, 0)


def _tq_args(**changes):
    names = ("w", "dtype", "n", "codes", "scale", "workspace", "workspace_len", "device", "stream")
    args = dict(zip(names, _TQ_OK, strict=True))
    args.update(changes)
    return tuple(args[n] for n in names)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dtype": 3}, "dtype code"),
        ({"dtype": -1}, "dtype code"),
        ({"n": 0}, "n must be > 0"),
        ({"n": 2**62}, "overflow"),
        ({"w": 0}, "w must be a device address"),
        ({"codes": 0}, "codes must be a device address"),
        ({"scale": 0}, "scale must be a device address"),
        ({"workspace": 0}, "workspace must be a device address"),
        ({"workspace": 0x4004}, "aligned to 8 bytes"),
        ({"workspace_len": 5}, r"workspace holds 5 doubles; n=5000 needs ternary_quant_workspace\(n\) = 6"),
        ({"device": -1}, "device must be >= 0"),
    ],
)
def test_core_ternary_quant_rejects_bad_arguments(core, changes, match):
    # Checked before any CUDA call, so these run without a GPU (and never touch the fake addresses).
    with pytest.raises(ValueError, match=f"ternary_quant: .*{match}"):
        core.ternary_quant(*_tq_args(**changes))


@pytest.mark.parametrize(
    "n, doubles",
    [
        (1, 1),
        (1024, 1),
        (1025, 2 + 1),
        (5000, 5 + 1),
        (1024 * 1024, 1024 + 1),
        (1024 * 1024 + 1, 1025 + 2 + 1),
        (2560 * 6912, 17280 + 17 + 1),
        (2**40, 2**30 + 2**20 + 1024 + 1),
    ],
)
def test_core_ternary_quant_workspace(core, n, doubles):
    # One double per chunk of 1024 at each level of the pairwise tree, down to the root.
    assert core.ternary_quant_workspace(n) == doubles


def test_core_ternary_quant_workspace_rejects_empty(core):
    with pytest.raises(ValueError, match="ternary_quant: n must be > 0"):
        core.ternary_quant_workspace(0)


def test_core_launch_without_device_raises(core):
    if core.device_count() > 0:
        pytest.skip("a CUDA device is usable here; this checks the error path without one")
    with pytest.raises(RuntimeError, match=r"act_quant_int8: .*cuda(Error|GetDevice)") as info:
        core.act_quant_int8(0x1000, 0, 2, 3, 0x2000, 0x3000, 0, 0)
    assert core.runtime_status() != "cudaSuccess"
    assert "driver supports" in str(info.value)
    with pytest.raises(RuntimeError, match=r"i2s_matmul: .*cuda(Error|GetDevice)"):
        core.i2s_matmul(*_I2S_OK)
    with pytest.raises(RuntimeError, match=r"ternary_quant: .*cuda(Error|GetDevice)"):
        core.ternary_quant(*_TQ_OK)


# ---- nvcc -------------------------------------------------------------------------------------


def _nvcc(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=tmp_path)
    return proc, time.monotonic() - start


def test_every_kernel_source_is_built():
    # The nvcc tests below cover every .cu file; CMakeLists.txt must build every one of them.
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert {f.name for f in CU_FILES} >= {"act_quant.cu", "i2s_matmul.cu", "ternary_quant.cu"}
    for f in CU_FILES:
        assert f"csrc/cuda/{f.name}" in cmake, f.name


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", CU_FILES, ids=[f.name for f in CU_FILES])
def test_nvcc_compiles_kernel(tmp_path, src, arch):
    out = tmp_path / f"{src.stem}_{arch}.o"
    proc, _ = _nvcc(tmp_path, "-c", f"-arch={arch}", "-std=c++17", str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


def _ptx(tmp_path: Path, src: Path) -> str:
    ptx = tmp_path / f"{src.stem}.ptx"
    proc, _ = _nvcc(tmp_path, "-ptx", "-arch=sm_90", "-std=c++17", str(src), "-o", str(ptx))
    assert proc.returncode == 0, proc.stderr
    return ptx.read_text()


# Approximate division/reciprocal, flushed subnormals and fused multiply-adds would all change bits.
_INEXACT = ("div.approx", "div.full", "rcp.approx", ".ftz.", "fma.rn.f32", "fma.rn.f64")


@needs_nvcc
def test_kernel_ptx_uses_exact_float_ops(tmp_path):
    # Bit-exactness needs IEEE division, single-rounding multiplies and round-half-even; this
    # catches a rewrite into `*` and `/` under fast-math flags or an approximate reciprocal.
    text = _ptx(tmp_path, KERNEL_SRC)
    assert "div.rn.f32" in text
    assert "mul.rn.f32" in text
    assert "cvt.rni.f32.f32" in text
    for bad in _INEXACT:
        assert bad not in text, bad


@needs_nvcc
def test_i2s_matmul_ptx_uses_exact_epilogue_and_int8_units(tmp_path):
    # Epilogue: float32(D - S) correctly rounded, IEEE division, one rounded multiply; compiled
    # without --fmad=false here, so the explicit intrinsics must be what keeps FMAs out.
    text = _ptx(tmp_path, CUDA_DIR / "i2s_matmul.cu")
    for op in ("cvt.rn.f32.s32", "div.rn.f32", "mul.rn.f32"):
        assert op in text, op
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in text  # prefill: int8 tensor cores
    assert "dp4a.s32.s32" in text  # decode
    for bad in _INEXACT:
        assert bad not in text, bad


@needs_nvcc
def test_ternary_quant_ptx_uses_exact_float_ops(tmp_path):
    text = _ptx(tmp_path, CUDA_DIR / "ternary_quant.cu")
    # the pairwise tree: rounded float64 additions only; the scale: IEEE float64 division, rounded
    # conversion to float32, IEEE float32 reciprocal; the codes: one rounded multiply, rint
    for op in ("add.rn.f64", "div.rn.f64", "cvt.rn.f32.f64", "div.rn.f32", "mul.rn.f32", "cvt.rni.f32.f32"):
        assert op in text, op
    for bad in (*_INEXACT, "add.f64", "mul.f64"):
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


# ---- GPU: i2s_matmul, bitlinear_infer, ternary_quant, packed BitLinear ---------------------------


@contextlib.contextmanager
def _no_sync():
    """Any synchronizing torch call (.item(), .cpu(), a blocking copy) inside raises."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _assert_same_floats(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    bits, want_bits = (t.view(torch.int32 if t.dtype == torch.float32 else torch.int64) for t in (got, want))
    bad = (bits != want_bits).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} values differ, first at {tuple(bad[0].tolist())}: "
        f"{got[tuple(bad[0])].item()!r} != {want[tuple(bad[0])].item()!r}"
    )


def _i2s_case(n: int, m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU (q, x_scale, packed): rows of very different magnitudes, random ternary weights."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (m, k), dtype=torch.int8, generator=g)
    packed = reference.pack(codes, torch.tensor(0.0437), "i2_s")
    x = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n).unsqueeze(1)
    q, x_scale = reference.act_quant_int8(x)
    return q, x_scale, packed


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("k", [128, 384, 2560, 6912])
@pytest.mark.parametrize("m", [1, 7, 257, 2560])
@pytest.mark.parametrize("n", [1, 3, 17, 128, 300])  # 1 and 3 take the decode GEMV, the rest the GEMM
def test_i2s_matmul_matches_reference(native_core, n, m, k):
    q, x_scale, packed = _i2s_case(n, m, k, seed=n * 7919 + m * 31 + k)
    want = reference.i2s_matmul(q, x_scale, packed, m)
    args = [t.cuda() for t in (q, x_scale, packed)]
    torch.cuda.synchronize()
    with _no_sync():
        got = ops.i2s_matmul(*args, m)
    assert got.device == args[0].device
    _assert_same_floats(got, want)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 7, 8, 9, 16, 64, 65])  # every GEMV width, the switch to the GEMM
def test_i2s_matmul_every_row_count(native_core, n):
    q, x_scale, packed = _i2s_case(n, 97, 1152, seed=n)
    _assert_same_floats(
        ops.i2s_matmul(q.cuda(), x_scale.cuda(), packed.cuda(), 97), reference.i2s_matmul(q, x_scale, packed, 97)
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n, m", [(1000, 2560), (640, 6912)])
def test_i2s_matmul_large_prefill_tiles(native_core, n, m):
    # Enough tiles for the 64 x 128 block tile on any current GPU (the kernel picks it by SM count).
    q, x_scale, packed = _i2s_case(n, m, 384, seed=n + m)
    _assert_same_floats(
        ops.i2s_matmul(q.cuda(), x_scale.cuda(), packed.cuda(), m), reference.i2s_matmul(q, x_scale, packed, m)
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n", [1, 2, 40])
def test_i2s_matmul_extreme_sums(native_core, n):
    # All -128 / all 127 rows against rows of all -1 / all +1 codes: the largest int32 sums.
    k, m = 6912, 4
    codes = torch.tensor([-1, 1, 0, -1], dtype=torch.int8).repeat_interleave(k).view(m, k).contiguous()
    packed = reference.pack(codes, torch.tensor(1.0), "i2_s")
    q = torch.stack([torch.full((k,), -128), torch.full((k,), 127)]).to(torch.int8).repeat(n, 1)[:n]
    x_scale = torch.ones(n)
    _assert_same_floats(
        ops.i2s_matmul(q.cuda(), x_scale.cuda(), packed.cuda(), m), reference.i2s_matmul(q, x_scale, packed, m)
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n", [1, 5, 40])
def test_i2s_matmul_any_packed_bytes(native_core, n):
    # Code 3 (no packer writes it) must still give the reference's (byte >> shift & 3) - 1 = 2.
    m, k = 33, 640
    g = torch.Generator().manual_seed(n)
    packed = torch.randint(0, 256, (m * k // 4 + 32,), dtype=torch.uint8, generator=g)
    packed[m * k // 4 :] = 0
    packed[m * k // 4 : m * k // 4 + 4] = torch.tensor([0.031], dtype=torch.float32).view(torch.uint8)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x_scale = torch.rand(n, generator=g) * 100 + 0.5
    _assert_same_floats(
        ops.i2s_matmul(q.cuda(), x_scale.cuda(), packed.cuda(), m), reference.i2s_matmul(q, x_scale, packed, m)
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("q_offset, packed_offset", [(1, 0), (0, 3), (8, 8), (16, 16)])
@pytest.mark.parametrize("n", [1, 6, 40])
def test_i2s_matmul_unaligned_buffers(native_core, n, q_offset, packed_offset):
    # Views into larger buffers: q and packed need not be 16-byte aligned (the kernels fall back to
    # byte loads), nor the float32 scale in the packed tail.
    m, k = 65, 384
    q, x_scale, packed = _i2s_case(n, m, k, seed=n + q_offset)
    q_buf = torch.zeros(n * k + q_offset, dtype=torch.int8, device="cuda")
    q_buf[q_offset:] = q.reshape(-1).cuda()
    p_buf = torch.zeros(packed.numel() + packed_offset, dtype=torch.uint8, device="cuda")
    p_buf[packed_offset:] = packed.cuda()
    q_view, p_view = q_buf[q_offset:].view(n, k), p_buf[packed_offset:]
    assert q_view.storage_offset() == q_offset and p_view.storage_offset() == packed_offset
    got = ops.i2s_matmul(q_view, x_scale.cuda(), p_view, m)
    _assert_same_floats(got, reference.i2s_matmul(q, x_scale, packed, m))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n", [1, 40])
def test_i2s_matmul_on_side_stream(native_core, n):
    q, x_scale, packed = _i2s_case(n, 257, 2560, seed=11)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        args = [t.to("cuda") * 1 if t.dtype == torch.float32 else t.to("cuda") for t in (q, x_scale, packed)]
        out = ops.i2s_matmul(*args, 257)
    side.synchronize()
    _assert_same_floats(out, reference.i2s_matmul(q, x_scale, packed, 257))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 8, 9, 130])
def test_bitlinear_infer_matches_reference(native_core, n, dtype):
    m, k = 257, 768
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(-1, 2, (m, k), dtype=torch.int8, generator=g)
    packed = reference.pack(codes, torch.tensor(0.02), "i2_s")
    x = _awkward(n, k, dtype, seed=n)
    xd, pd = x.cuda(), packed.cuda()
    torch.cuda.synchronize()
    with _no_sync():
        got = ops.bitlinear_infer(xd, pd, m)
    _assert_same_floats(got, reference.bitlinear_infer(x, packed, m))


@pytest.mark.cuda
@needs_gpu
def test_i2s_reference_backend_and_fallback_agree(native_core, monkeypatch):
    q, x_scale, packed = _i2s_case(17, 65, 384, seed=5)
    x = _awkward(3, 384, torch.bfloat16, seed=5)
    args = [t.cuda() for t in (q, x_scale, packed)]
    native = ops.i2s_matmul(*args, 65)
    native_infer = ops.bitlinear_infer(x.cuda(), args[2], 65)
    monkeypatch.setattr(i2s, "cuda_core", lambda: None)  # as if built without CUDA
    for got, want in ((ops.i2s_matmul(*args, 65), native), (ops.bitlinear_infer(x.cuda(), args[2], 65), native_infer)):
        assert got.device == want.device
        _assert_same_floats(got, want.cpu())
    monkeypatch.undo()
    ops.set_backend("reference")
    try:
        _assert_same_floats(ops.i2s_matmul(*args, 65), native.cpu())
        _assert_same_floats(ops.bitlinear_infer(x.cuda(), args[2], 65), native_infer.cpu())
    finally:
        ops.set_backend("native")


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
def test_i2s_matmul_more_row_tiles_than_grid(native_core):
    # Past 65535 row tiles of 64 the GEMM loops over tiles in the grid's y dimension.
    n, m, k = 65535 * 64 + 100, 3, 128
    g = torch.Generator().manual_seed(0)
    packed = reference.pack(torch.randint(-1, 2, (m, k), dtype=torch.int8, generator=g), torch.tensor(0.5), "i2_s")
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x_scale = torch.rand(n, generator=g) + 0.5
    out = ops.i2s_matmul(q.cuda(), x_scale.cuda(), packed.cuda(), m).cpu()
    chunk = 1 << 20
    for i in range(0, n, chunk):
        _assert_same_floats(
            out[i : i + chunk], reference.i2s_matmul(q[i : i + chunk], x_scale[i : i + chunk], packed, m)
        )


def _wide_weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Magnitudes over many decades, a few huge ones: float64 sums that depend on the order of the
    additions, so only the reference's pairwise tree gives its bits."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    lo, hi, big = (-7, 4, 6e4) if dtype == torch.float16 else (-12, 6, 1e16)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w *= torch.pow(10.0, torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g))
    w[::997] = big * torch.rand(w[::997].shape, generator=g, dtype=torch.float64)
    return w.clamp(-big, big).to(dtype).view(shape)


def _ternary_core(core, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = w.numel()
    codes = torch.empty(n, dtype=torch.int8, device=w.device)
    scale = torch.empty(1, dtype=torch.float32, device=w.device)
    workspace = torch.empty(core.ternary_quant_workspace(n), dtype=torch.float64, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    core.ternary_quant(
        w.data_ptr(),
        _backend.dtype_code(w),
        n,
        codes.data_ptr(),
        scale.data_ptr(),
        workspace.data_ptr(),
        workspace.numel(),
        w.device.index,
        stream,
    )
    return codes, scale, workspace


def _assert_ternary_matches(w: torch.Tensor, codes, scale, workspace) -> None:
    w = w.cpu().reshape(1, -1)
    codes_ref, scale_ref = reference.ternary_quant(w)
    # The root of the tree (the workspace's last entry) and the chunk sums, bit for bit.
    absw = w.abs().to(torch.float64)
    _assert_same_floats(workspace[-1:], reference.pairwise_sum(absw))
    chunks = -(-w.numel() // reference.PAIR_CHUNK)
    padded = torch.nn.functional.pad(absw, (0, chunks * reference.PAIR_CHUNK - w.numel()))
    _assert_same_floats(workspace[:chunks], reference.pairwise_sum(padded.view(chunks, -1)))
    _assert_same_floats(scale, scale_ref.reshape(1))
    bad = (codes.cpu() != codes_ref.reshape(-1)).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} codes differ, first at {bad[0].item()}"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (1023,), (1024,), (1025,), (1024 * 1024 + 3,), (2560, 6912)])
def test_ternary_quant_matches_reference(native_core, shape, dtype):
    w = _wide_weights(shape, dtype, seed=sum(shape)).cuda()
    torch.cuda.synchronize()
    with _no_sync():
        got = _ternary_core(native_core, w)
    _assert_ternary_matches(w, *got)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3000, 70_001])
def test_ternary_quant_gaussian_and_floor(native_core, n, dtype):
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, generator=g) * 0.02).to(dtype)
    _assert_ternary_matches(w, *_ternary_core(native_core, w.cuda()))
    tiny = (torch.randn(n, generator=g) * 1e-7).to(dtype)  # the mean is below the 1e-5 floor
    codes, scale, ws = _ternary_core(native_core, tiny.cuda())
    assert scale.item() == torch.tensor(1e-5, dtype=torch.float32).item()
    _assert_ternary_matches(tiny, codes, scale, ws)
    zeros = torch.zeros(n, dtype=dtype)
    codes, scale, ws = _ternary_core(native_core, zeros.cuda())
    assert not codes.any()
    _assert_ternary_matches(zeros, codes, scale, ws)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("offset", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ternary_quant_unaligned_buffers(native_core, offset, dtype):
    # w a view at an odd element offset (scalar loads), codes at an odd byte offset (byte stores).
    n = 5000
    w_buf = _wide_weights((n + offset,), dtype, seed=offset).cuda()
    w = w_buf[offset:]
    codes_buf = torch.empty(n + offset, dtype=torch.int8, device="cuda")
    codes = codes_buf[offset:]
    scale = torch.empty(1, dtype=torch.float32, device="cuda")
    ws = torch.empty(native_core.ternary_quant_workspace(n), dtype=torch.float64, device="cuda")
    native_core.ternary_quant(
        w.data_ptr(),
        _backend.dtype_code(w),
        n,
        codes.data_ptr(),
        scale.data_ptr(),
        ws.data_ptr(),
        ws.numel(),
        w.device.index,
        torch.cuda.current_stream().cuda_stream,
    )
    _assert_ternary_matches(w, codes, scale, ws)


@pytest.mark.cuda
@needs_gpu
def test_ternary_quant_on_side_stream(native_core):
    w = _wide_weights((300, 4099), torch.bfloat16, seed=3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        wd = w.to("cuda") * 1  # produced on the side stream
        got = _ternary_core(native_core, wd)
    side.synchronize()
    _assert_ternary_matches(w, *got)


def _packed_layer(k: int, m: int, *, subln: bool, seed: int) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(k, m, bias=True, subln=subln)
    with torch.no_grad():
        layer.bias.normal_()
        if subln:
            layer.subln.weight.uniform_(0.5, 1.5)
    return layer.pack().eval()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_packed_bitlinear_cuda_forward_equals_cpu(native_core, tokens, subln, dtype):
    # in_features 300 is padded to 384 in the packed weight; 1 and 5 tokens take the GEMV, 40 the GEMM.
    layer = _packed_layer(300, 257, subln=subln, seed=tokens)
    x = torch.randn(2, tokens, 300).to(dtype)
    with torch.no_grad():
        want = layer(x)
        gpu = copy.deepcopy(layer).cuda()
        assert gpu.packed.is_cuda and gpu.weight is None
        got = gpu(x.cuda())
    assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)
