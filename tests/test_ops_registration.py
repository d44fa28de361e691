"""The ops as torch.library custom ops: schema and fake kernels (opcheck), torch.compile, backends."""

import os
import subprocess
import sys

import pytest
import torch

from wrinklefree import ops


def op_samples():
    w = torch.randn(33, 256) * 0.02
    codes, scale = ops.ternary_quant(w)
    packed = ops.pack(codes, scale, "i2_s")
    x = torch.randn(3, 256)
    q, x_scale = ops.act_quant_int8(x)
    lib = torch.ops.wrinklefree
    return [
        (lib.ternary_quant, (w,)),
        (lib.act_quant_int8, (x,)),
        (lib.rmsnorm_act_quant, (x, torch.ones(256), 1e-5)),
        (lib.pack, (codes, scale, "i2_s")),
        (lib.pack, (codes, scale, "tq1_0")),
        (lib.unpack, (packed, [33, 256], "i2_s")),
        (lib.i2s_matmul, (q, x_scale, packed, 33)),
        (lib.bitlinear_infer, (x, packed, 33)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = op_samples()[index]
    # schema, fake kernel against the real one, dispatcher consistency; no autograd on integer ops
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    codes, scale = ops.ternary_quant(torch.randn(65, 384) * 0.02)
    packed = ops.pack(codes, scale, "i2_s")

    def layer(x, norm_weight):
        q, s = ops.rmsnorm_act_quant(x, norm_weight, 1e-5)
        return ops.i2s_matmul(q, s, packed, 65)

    x, norm_weight = torch.randn(5, 384), torch.rand(384) + 0.5
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, norm_weight), layer(x, norm_weight))


def test_reference_backend_switch():
    x = torch.randn(4, 130)
    native = ops.act_quant_int8(x)
    ops.set_backend("reference")
    try:
        assert ops.get_backend() == "reference"
        ref = ops.act_quant_int8(x)
    finally:
        ops.set_backend("native")
    assert torch.equal(native[0], ref[0]) and torch.equal(native[1], ref[1])
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


@pytest.mark.parametrize("isa", ops.supported_isas())
def test_env_forces_isa(isa):
    result = _run("from wrinklefree import ops; print(ops.get_isa())", WF_CPU_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_env_rejects_unknown_isa():
    result = _run("from wrinklefree import ops; import torch; ops.act_quant_int8(torch.ones(1, 4))", WF_CPU_ISA="sse9")
    assert result.returncode != 0
    assert "WF_CPU_ISA='sse9' is not one of avx512, avx2, scalar" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [("3", "3"), ("0", None), ("abc", None), ("2000", None)])
def test_env_sets_threads_or_is_refused(value, expected):
    result = _run("from wrinklefree import ops; print(ops.get_num_threads())", WF_NUM_THREADS=value)
    if expected is None:
        assert result.returncode != 0
        assert f"WF_NUM_THREADS='{value}' is not an integer in [1, 1024]" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_set_isa_and_threads_errors(threads):
    with pytest.raises(ValueError, match="isa must be one of avx512, avx2, scalar; got 'neon'"):
        ops.set_isa("neon")
    with pytest.raises(ValueError, match=r"num_threads must be in \[1, 1024\], got 0"):
        ops.set_num_threads(0)


def test_kernels_work_after_fork():
    # the thread pool does not survive fork(); a child must rebuild it rather than hang
    code = (
        "import os, torch\n"
        "from wrinklefree import ops\n"
        "ops.set_num_threads(2)\n"
        "x = torch.randn(64, 4096)\n"
        "ops.act_quant_int8(x)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    q, s = ops.act_quant_int8(x)\n"
        "    os._exit(0 if q.shape == (64, 4096) else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_import_does_not_touch_cuda():
    result = _run("import wrinklefree, torch; print(torch.cuda.is_initialized())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_eager_fast_path_equals_dispatcher_path():
    # the public functions skip the dispatcher for plain CPU tensors; torch.ops goes through it
    x = torch.randn(5, 384)
    codes, scale = ops.ternary_quant(torch.randn(65, 384) * 0.02)
    packed = ops.pack(codes, scale, "i2_s")
    lib = torch.ops.wrinklefree
    assert torch.equal(ops.bitlinear_infer(x, packed, 65), lib.bitlinear_infer(x, packed, 65))
    q, s = ops.rmsnorm_act_quant(x, torch.ones(384), 1e-5)
    q2, s2 = lib.rmsnorm_act_quant(x, torch.ones(384), 1e-5)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert torch.equal(ops.i2s_matmul(q, s, packed, 65), lib.i2s_matmul(q, s, packed, 65))


def test_public_functions_respect_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 256)
        q, s = ops.act_quant_int8(x)
        packed = torch.empty(ops.FORMATS["i2_s"].nbytes(33, 256), dtype=torch.uint8)
        out = ops.bitlinear_infer(x, packed, 33)
    assert q.shape == (7, 256) and q.dtype == torch.int8 and s.shape == (7,)
    assert out.shape == (7, 33) and out.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:.*batching rule")
def test_public_functions_under_vmap():
    # torch.func wraps its tensors: the public functions must take the dispatcher (vmap's fallback
    # loops over the batch), not hand the wrapper to the C++ kernel
    x = torch.randn(3, 2, 256)
    codes, scale = ops.ternary_quant(torch.randn(33, 256) * 0.02)
    packed = ops.pack(codes, scale, "i2_s")
    q, s = torch.func.vmap(ops.act_quant_int8)(x)
    rows = [ops.act_quant_int8(row) for row in x]
    assert torch.equal(q, torch.stack([r[0] for r in rows])) and torch.equal(s, torch.stack([r[1] for r in rows]))
    y = torch.func.vmap(lambda r: ops.bitlinear_infer(r, packed, 33))(x)
    assert torch.equal(y, torch.stack([ops.bitlinear_infer(row, packed, 33) for row in x]))


def test_machine_probes(isa):
    # the ceilings the benchmark reports beside its timings
    assert ops.read_bandwidth(1 << 22, 2) > 1e8  # bytes/s
    assert ops.int8_mac_rate(0.01) > 1e8  # multiply-adds/s
    with pytest.raises(ValueError, match="reps must be >= 1"):
        ops.read_bandwidth(1 << 20, 0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        ops.int8_mac_rate(0.0)
