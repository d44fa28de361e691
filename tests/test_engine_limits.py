"""The engine's and the kernels' limits on what a file or a caller can ask for: each is refused with
an error naming it, never an overflow, a crash, a hang or NaN logits (context length, tensor sizes,
metadata arrays, threads, non-finite scales and hyperparameters)."""

import shutil
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
from test_engine import i2s_file, tokenizer  # noqa: F401  (fixtures)

from wrinklefree import _C, ops
from wrinklefree.export import i2s_readable


def edited_copy(src, dst, edit):
    """A copy of GGUF ``src`` at ``dst`` after ``edit(reader)`` changed its header values in place."""
    shutil.copy(src, dst)
    with i2s_readable():
        edit(gguf.GGUFReader(dst, "r+"))
    return dst


def test_context_length_past_the_limit_is_refused(i2s_file, tmp_path):  # noqa: F811
    def edit(reader):
        field = reader.fields["bitnet-b1.58.context_length"]
        field.parts[field.data[0]][0] = (1 << 24) + 1

    path = edited_copy(i2s_file, tmp_path / "ctx.gguf", edit)
    with pytest.raises(ValueError, match=r"ctx\.gguf: context_length must be in \[0, 2\^24\], got 16777217"):
        _C.Engine(str(path), 0, "f16")
    with pytest.raises(ValueError, match=r"n_ctx must be at most 2\^24, got 18014398509481984"):
        _C.Engine(str(i2s_file), 1 << 54, "f16")  # the KV cache's byte count would wrap around


def test_tensor_whose_byte_count_would_overflow_is_refused(i2s_file, tmp_path):  # noqa: F811
    # [2^21, 2^40] F16 values: each dimension is allowed, but 2^61 elements of 2 bytes pass int64
    def edit(reader):
        dims = next(t for t in reader.tensors if t.name == "token_embd.weight").field
        dims.parts[3][0] = 1 << 21  # parts: name length, name, dimension count, dims, type, offset
        dims.parts[3][1] = 1 << 40

    path = edited_copy(i2s_file, tmp_path / "dims.gguf", edit)
    with pytest.raises(ValueError, match=r"tensor token_embd\.weight: bad dimension"):
        _C.Engine(str(path), 16, "f16")


def test_metadata_arrays_have_an_element_budget(tmp_path):
    # 5M one-byte elements: 5 MB of file, but ~400 MB as parsed values; refused before they are read
    n = 5 << 20
    key = b"general.padding"
    blob = (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8, n)
        + bytes(n)
    )
    path = tmp_path / "big.gguf"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=r"big\.gguf: metadata arrays hold more than 2\^22 elements"):
        _C.Engine(str(path), 16, "f16")


def test_thread_count_is_bounded():
    with pytest.raises(ValueError, match=r"num_threads must be in \[1, 1024\], got 1025"):
        ops.set_num_threads(1025)


def test_threads_the_system_refuses_give_an_error_and_the_pool_recovers():
    # Under a 4 GiB address-space limit 1000 threads' stacks cannot all be mapped: the pool stops the
    # threads it started and reports, where it used to hang on its own condition variable.
    code = """
import resource
import torch
from wrinklefree import ops
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
ops.set_num_threads(1000)
try:
    ops.act_quant_int8(torch.randn(4096, 256))
except ValueError as e:
    print("refused:", e)
ops.set_num_threads(2)
q, scale = ops.act_quant_int8(torch.randn(4096, 256))
print("recovered", tuple(q.shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: cannot start 1000 threads" in proc.stdout
    assert "recovered (4096, 256)" in proc.stdout


def test_metadata_that_is_not_utf8_reads_with_replacement(i2s_file, tmp_path):  # noqa: F811
    blob = bytearray(i2s_file.read_bytes())
    at = blob.index(b"general.name") + len(b"general.")
    blob[at] = 0xFF  # the key becomes b"general.\xffame"
    path = tmp_path / "key.gguf"
    path.write_bytes(blob)
    metadata = _C.Engine(str(path), 16, "f16").metadata()
    assert "general.\ufffdame" in metadata and "general.name" not in metadata


def test_non_finite_scales_and_hyperparameters_are_refused(i2s_file, tmp_path):  # noqa: F811
    def rope(reader):
        field = reader.fields["bitnet-b1.58.rope.freq_base"]
        field.parts[field.data[0]][0] = float("inf")

    path = edited_copy(i2s_file, tmp_path / "rope.gguf", rope)
    with pytest.raises(ValueError, match=r"rope\.freq_base must be a finite number > 0, got inf"):
        _C.Engine(str(path), 16, "f16")

    def scale(reader):
        t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
        tail = reader.data[t.data_offset + t.n_bytes :][:4]  # i2s_readable: n_bytes covers the codes only
        tail[:] = np.frombuffer(np.float32(np.nan).tobytes(), dtype=np.uint8)

    path = edited_copy(i2s_file, tmp_path / "scale.gguf", scale)
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_q\.weight: its I2_S scale is nan"):
        _C.Engine(str(path), 16, "f16")
