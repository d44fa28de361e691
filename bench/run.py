"""Kernel benchmark: every wrinklefree op against its plain-PyTorch reference and, for the matmuls,
against torch's fp32 matmul, on the BitNet b1.58 2B4T shapes (DESIGN.md section 6); BitLinear
(training forward+backward, packed inference) against torch.nn.Linear on the same shapes; and a
whole training step of a converted Llama model against the same model in full precision.

    python bench/run.py [--quick] [--out PATH] [--threads N] [--isa avx512|avx2|scalar] [--kernels a,b]
    python bench/run.py --gpu [--quick] [--out PATH] [--kernels a,b]      (the CUDA/Triton kernels)
    python bench/run.py --e2e [2b4t|small] [--threads N] [--out PATH]    (bench/e2e.py: the inference engines)

Prints a table and the section-6 targets, and writes one JSON row per (kernel, provider, shape);
bench/README.md describes the flags and the schema. Benchmarks report, they never assert.

To add a benchmark, write a generator of :class:`Case` and decorate it with ``@register("name")``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import wrinklefree
from wrinklefree import _C, BitLinear, ops
from wrinklefree.ops import reference

# (K, M) of the 2B4T BitLinears: q/o, k/v, gate/up, down.
SHAPES_KM = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)]
BATCHES = [1, 128]  # decode (one token) and prefill (a 128-token prompt)

# Tokens per BitLinear training step. On a GPU a 128-token step is bound by kernel launches, not
# by the matmuls, so the GPU target is also measured at a training-size batch (4 x 2048 tokens).
TRAIN_TOKENS_CPU = [128]
TRAIN_TOKENS_CUDA = [128, 8192]

# Weights stream from DRAM in real decoding, but one 2B4T weight (0.4-4.4 MB packed) fits in this
# machine's 32 MiB L3. Timed calls therefore cycle over copies of their streamed operands so that
# one cycle touches ROTATE_BYTES and every call finds its data evicted. Twice the L3 is not enough
# here: the L3 is not strictly LRU, a 64 MiB cycle still read at ~1.5x the DRAM rate, a 128 MiB one
# at ~1.1x; the cycle is as large as the bandwidth probe's buffer, so both read equally cold data.
ROTATE_BYTES = 256 << 20
MAX_COPIES = 1024  # bounds memory and warm-up for tiny operands (N=1 activations stay in L3 anyway)

# The probe buffer is 8x the L3, so it measures DRAM, not cache.
BW_PROBE_BYTES = 256 << 20

# A call moving less than this is bound by call overhead (the op dispatch alone is ~10-20 us), not
# by bandwidth, so the quant-kernel bandwidth target is not judged on it.
MIN_BW_TARGET_BYTES = 1 << 20

DECODE_BW_SHARE = 0.80
PREFILL_GMACS = 400.0
PREFILL_VS_FP32 = 3.0
QUANT_BW_SHARE = 0.50
GPU_QUANT_BW_SHARE = 0.80  # quant kernels' share of the HBM read bandwidth (GPU)
GEMV_VS_CUBLAS = 3.0  # decode: the I2_S GEMV's speedup over cuBLAS's bf16 GEMV (GPU)
TRAIN_TIME_VS_LINEAR = 1.15  # BitLinear forward+backward time over a bf16 nn.Linear's (GPU)
TRAIN_STEP_VS_FULL = 1.15  # BitNet model's training step time over the same model's in bf16 (GPU)

# --gpu: activations of a training batch (4 x 2048 tokens) for the quant kernels; the HBM probe
# reads a buffer far larger than any GPU's L2.
GPU_TOKENS = 8192
HBM_PROBE_BYTES = 1 << 30
# SmolLM2-135M's BitLinears (K, M): q/o, k/v, gate/up, down; the GPU training target covers them.
SMOLLM2_SHAPES_KM = [(576, 576), (576, 192), (576, 1536), (1536, 576)]

# Models of the train_step entry, built with random weights (no download): "tiny" is read from
# configs/model/tiny.yaml (the embedded default's model), "smollm2_135m" has SmolLM2-135M's shape.
TRAIN_STEP_MODELS = {
    "smollm2_135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    ),
}
# (batch, sequence length) of one step. On 2 CPU cores a step takes ~0.5 s (tiny) and ~2.7 s
# (smollm2_135m); on a GPU the batch is a training batch.
TRAIN_STEP_BATCH_CPU = {"tiny": (8, 256), "smollm2_135m": (1, 256)}
TRAIN_STEP_BATCH_CUDA = {"tiny": (8, 1024), "smollm2_135m": (8, 2048)}


@dataclass
class Provider:
    """One implementation of a case: ``fn(*args)`` is the timed call."""

    fn: Callable[..., object]
    args: tuple
    rotate: tuple[int, ...] = ()  # indices of args (tensors or modules) that stream from memory in real use
    nbytes: int | None = None  # bytes moved per call, where this provider's formats differ from the case's
    stream_bytes: int | None = None  # likewise for the bandwidth-share numerator
    slow: bool = False  # skipped by --quick
    # Times calls in native code instead of around fn: timer(arg_sets, reps) makes reps calls,
    # call r on arg_sets[r % len(arg_sets)], and returns each call's seconds.
    timer: Callable[[list[tuple], int], list[float]] | None = None


@dataclass
class Case:
    kernel: str
    shape: dict
    providers: dict[str, Provider]
    baseline: str  # provider the ratio column compares against
    nbytes: int | None  # bytes moved per call in our formats: inputs + outputs (None: not modelled)
    macs: int | None = None  # multiply-adds per call, for matmuls
    memory_bound: bool = False  # report the share of the read bandwidth measured beside it
    stream_bytes: int | None = None  # bytes the share is computed from (default: nbytes)
    int8_matmul: bool = False  # our providers run the int8 matmul kernel: report their share of its peak
    mode: str = "forward"  # or "full": forward and backward
    device: str = "cpu"  # where the timed calls run; "cuda" synchronizes after each call
    tokens: int | None = None  # tokens one call processes, for tokens/s (train_step)
    min_reps: int | None = None  # at least this many timed calls, instead of Settings.min_reps


@dataclass
class Settings:
    quick: bool
    budget_s: float  # timed calls per provider: about this long in all
    warmup_s: float
    min_reps: int
    max_reps: int
    probe_reps: int
    formats: tuple[str, ...] = ("i2_s",)  # packed formats for pack/unpack
    device: str = "cpu"  # where the --gpu entries run ("cuda"; tests build them on "cpu")


REGISTRY: dict[str, Callable[[Settings], Iterator[Case]]] = {}
GPU_REGISTRY: dict[str, Callable[[Settings], Iterator[Case]]] = {}  # the --gpu suite


def register(kernel: str, gpu: bool = False):
    def deco(make_cases: Callable[[Settings], Iterator[Case]]):
        (GPU_REGISTRY if gpu else REGISTRY)[kernel] = make_cases
        return make_cases

    return deco


# ---- data -------------------------------------------------------------------------------------


@dataclass
class Weight:
    w: torch.Tensor  # float32 [M, K]
    codes: torch.Tensor  # int8 [M, K]
    scale: torch.Tensor
    packed: torch.Tensor  # i2_s bytes


@functools.cache
def weight(m: int, k: int) -> Weight:
    g = torch.Generator().manual_seed(m * 100_003 + k)
    w = torch.randn(m, k, generator=g) * 0.02
    codes, scale = ops.ternary_quant(w)
    return Weight(w, codes, scale, ops.pack(codes, scale, "i2_s"))


def activations(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 100_003 + k + 1)
    return torch.randn(n, k, generator=g)


def fp32_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


def core_matmul(fmt: str, args: tuple, **kw) -> Provider:
    """The C++ ``fmt`` ("i2_s" or "tq1_0") matmul on ``args = (q, x_scale, packed, m, out)``, as the
    inference engine calls it: no Python op wrapper (argument checks, dispatch, output allocation),
    whose fixed cost is reported separately. Its calls are timed in C++, back to back as the engine
    makes them (a Python call costs about 1.5 us, 10% of a (2560, 640) decode matmul); only the packed
    weight rotates. TQ1_0's scale is 1: it only scales the output."""

    def timer(arg_sets: list[tuple], reps: int) -> list[float]:
        q, x_scale, packed, m, out = arg_sets[0]
        n, k = q.shape
        ptrs = [a[2].data_ptr() for a in arg_sets]
        return _C.time_matmul(
            fmt, q.data_ptr(), x_scale.data_ptr(), n, k, ptrs, packed.numel(), m, 1.0, out.data_ptr(), reps
        )

    return Provider(lambda *a: timer([a], 1), args, rotate=(2,), timer=timer, **kw)


def packed_bytes(fmt: str, m: int, k: int) -> int:
    return ops.FORMATS[fmt].nbytes(m, k)


def same_weight_layers(m: int, k: int, device: str = "cpu") -> tuple[BitLinear, nn.Linear]:
    """A BitLinear (training mode, no schedule: fully quantized) and an nn.Linear, both [M, K]
    without bias, holding the same float32 weight."""
    layers = BitLinear(k, m, bias=False, device=device), nn.Linear(k, m, bias=False, device=device)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight(m, k).w)
    return layers


def forward_backward(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """A layer's share of a training step: forward, then the gradients to the input and the weight.
    torch.autograd.grad returns them instead of accumulating into ``.grad``, so every timed call
    does the same work. On CUDA the layer runs under bf16 autocast, as mixed-precision training does.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        y = layer(x)
    torch.autograd.grad(y, (x, layer.weight), grad_out)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> None:
    """One optimizer step of a causal LM: the loss is transformers' cross-entropy of the next
    token (labels = input_ids). On CUDA the forward runs under bf16 autocast, as the trainer's."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.is_cuda):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()


@torch.no_grad()
def inference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# ---- benchmark entries ------------------------------------------------------------------------


def _matmul_cases(kernel: str, ours: Callable, ref: Callable, float_input: bool) -> Iterator[Case]:
    for k, m in SHAPES_KM:
        wt = weight(m, k)
        for n in BATCHES:
            x = activations(n, k)
            if float_input:
                args, in_bytes = (x, wt.packed, m), 4 * n * k
            else:
                q, x_scale = ops.act_quant_int8(x)
                args, in_bytes = (q, x_scale, wt.packed, m), n * k + 4 * n
            packed_at = len(args) - 2
            providers = {"wrinklefree": Provider(ours, args, rotate=(packed_at,))}
            if not float_input:
                out = torch.empty(n, m)
                providers["wrinklefree_core"] = core_matmul("i2_s", (*args, out))
            fp32 = Provider(
                fp32_matmul,
                (x, wt.w),
                rotate=(1,),
                nbytes=4 * (n * k + m * k + n * m),
                stream_bytes=4 * m * k,
            )
            yield Case(
                kernel=kernel,
                shape={"N": n, "K": k, "M": m},
                providers={
                    **providers,
                    "torch_fp32": fp32,
                    # exact int64 matmul: slow, a correctness definition rather than a baseline
                    "reference": Provider(ref, args, rotate=(packed_at,), slow=True),
                },
                baseline="torch_fp32",
                nbytes=m * k // 4 + in_bytes + 4 * n * m,
                macs=n * m * k,
                memory_bound=n == 1,
                # at N=1 the packed weight is all that matters; activations and output are tiny
                stream_bytes=m * k // 4,
                int8_matmul=True,
            )


@register("i2s_matmul")
def i2s_matmul_cases(s: Settings) -> Iterator[Case]:
    yield from _matmul_cases("i2s_matmul", ops.i2s_matmul, reference.i2s_matmul, float_input=False)


@register("tq1_0_matmul")
def tq1_0_matmul_cases(s: Settings) -> Iterator[Case]:
    """The engine's TQ1_0 matmul (1.69 bits a weight, run as stored) against the I2_S one (2 bits) on
    the same codes, both in C++ as the engine calls them. At N = 1 the share of read bandwidth is of
    each format's own weight bytes."""
    for k, m in SHAPES_KM:
        wt = weight(m, k)
        tq1 = ops.pack(wt.codes, torch.tensor(1.0), "tq1_0")
        for n in BATCHES:
            q, x_scale = ops.act_quant_int8(activations(n, k))
            out = torch.empty(n, m)
            yield Case(
                kernel="tq1_0_matmul",
                shape={"N": n, "K": k, "M": m},
                providers={
                    "wrinklefree_core": core_matmul(
                        "tq1_0",
                        (q, x_scale, tq1, m, out),
                        nbytes=tq1.numel() + n * k + 4 * n * m,
                        stream_bytes=tq1.numel(),
                    ),
                    "i2s_core": core_matmul(
                        "i2_s",
                        (q, x_scale, wt.packed, m, out),
                        nbytes=wt.packed.numel() + n * k + 4 * n * m,
                        stream_bytes=wt.packed.numel(),
                    ),
                },  # fmt: skip
                baseline="i2s_core",
                nbytes=None,
                macs=n * m * k,
                memory_bound=n == 1,
                int8_matmul=True,
            )


@register("bitlinear_infer")
def bitlinear_infer_cases(s: Settings) -> Iterator[Case]:
    yield from _matmul_cases("bitlinear_infer", ops.bitlinear_infer, reference.bitlinear_infer, float_input=True)


@register("bitlinear_train")
def bitlinear_train_cases(s: Settings) -> Iterator[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the DESIGN target compares with a bf16 Linear, which is what autocast runs on CUDA
    baseline = "torch_bf16" if device == "cuda" else "torch_fp32"
    out_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # --quick: q/o only; a CPU step at the gate/up/down shapes takes ~0.25-0.5 s. On a GPU the
    # target also covers SmolLM2-135M's shapes, and onebitllms's BitNetLinear runs where installed.
    shapes = SHAPES_KM[:1] if s.quick else SHAPES_KM + (SMOLLM2_SHAPES_KM if device == "cuda" else [])
    ob = onebitllms_kernels() if device == "cuda" else None
    for k, m in shapes:
        bitlinear, linear = same_weight_layers(m, k, device)
        extra = {}
        if ob is not None:
            theirs = ob.BitNetLinear(k, m, bias=False).to(device)
            with torch.no_grad():
                theirs.weight.copy_(linear.weight)
            extra["onebitllms"] = theirs
        for n in TRAIN_TOKENS_CUDA if device == "cuda" else TRAIN_TOKENS_CPU:
            x = activations(n, k).to(device).requires_grad_()
            g = torch.Generator().manual_seed(n * 100_003 + m + 2)
            grad_out = torch.randn(n, m, generator=g).to(device, out_dtype)
            # No cache rotation: at N >= 128 the three matmuls, not the weight reads, set the time.
            yield Case(
                kernel="bitlinear_train",
                shape={"N": n, "K": k, "M": m},
                providers={
                    "wrinklefree": Provider(forward_backward, (bitlinear, x, grad_out)),
                    baseline: Provider(forward_backward, (linear, x, grad_out)),
                    **{name: Provider(forward_backward, (layer, x, grad_out)) for name, layer in extra.items()},
                },
                baseline=baseline,
                # in: x, W (float32), grad_out; out: y, dx (float32), dW (float32)
                nbytes=4 * (2 * n * k + 2 * m * k) + 2 * n * m * grad_out.element_size(),
                macs=3 * n * m * k,  # y = x W^T, dx = dy W, dW = dy^T x
                mode="full",
                device=device,
            )


@register("bitlinear_packed")
def bitlinear_packed_cases(s: Settings) -> Iterator[Case]:
    for k, m in SHAPES_KM:
        bitlinear, linear = same_weight_layers(m, k)
        bitlinear.pack()
        weight_bytes = bitlinear.packed.numel()  # M * K / 4 + 32
        for n in BATCHES:
            x = activations(n, k)
            yield Case(
                kernel="bitlinear_packed",
                shape={"N": n, "K": k, "M": m},
                providers={
                    # the weight streams in decoding: calls cycle over deep copies of the layer
                    "wrinklefree": Provider(inference_forward, (bitlinear, x), rotate=(0,)),
                    "torch_fp32": Provider(
                        inference_forward,
                        (linear, x),
                        rotate=(0,),
                        nbytes=4 * (n * k + m * k + n * m),
                        stream_bytes=4 * m * k,
                    ),
                },
                baseline="torch_fp32",
                nbytes=weight_bytes + 4 * n * k + 4 * n * m,
                macs=n * m * k,
                memory_bound=n == 1,
                stream_bytes=weight_bytes,
                int8_matmul=True,
            )


# ---- GPU (--gpu) ------------------------------------------------------------------------------
# The same ops on CUDA tensors: the Triton quantizers and the CUDA I2_S GEMV/GEMM. Memory-bound
# rows report their share of the HBM read bandwidth probed beside them. Where the onebitllms
# package is installed its Triton kernels run in the same cases (they fake-quantize: they write
# the dequantized tensor where ours write int8 codes).


@functools.cache
def onebitllms_kernels():
    try:
        import onebitllms
    except ImportError:
        return None
    return onebitllms


def gpu_activations(n: int, k: int, device: str) -> torch.Tensor:
    """bf16 activations, as a BitLinear sees them under mixed-precision training."""
    return activations(n, k).to(device, torch.bfloat16)


@register("act_quant_int8", gpu=True)
def gpu_act_quant_cases(s: Settings) -> Iterator[Case]:
    ob = onebitllms_kernels()
    for k in _activation_ks():
        n = GPU_TOKENS
        x = gpu_activations(n, k, s.device)
        providers = {
            "wrinklefree": Provider(ops.act_quant_int8, (x,)),
            "reference": Provider(reference.act_quant_int8, (x,)),
        }
        if ob is not None:
            # it takes [batch, seq, hidden]
            providers["onebitllms"] = Provider(ob.activation_quant_triton, (x.unsqueeze(0),), nbytes=2 * x.nbytes)
        yield Case(
            kernel="act_quant_int8",
            shape={"N": n, "K": k, "dtype": "bf16"},
            providers=providers,
            baseline="reference",
            nbytes=x.nbytes + n * k + 4 * n,
            memory_bound=True,
            device=s.device,
        )


@register("rmsnorm_act_quant", gpu=True)
def gpu_rmsnorm_act_quant_cases(s: Settings) -> Iterator[Case]:
    for k in _activation_ks():
        n = GPU_TOKENS
        x = gpu_activations(n, k, s.device)
        gain = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5).to(s.device)
        args = (x, gain, 1e-5)
        yield Case(
            kernel="rmsnorm_act_quant",
            shape={"N": n, "K": k, "dtype": "bf16"},
            providers={
                "wrinklefree": Provider(ops.rmsnorm_act_quant, args),
                "reference": Provider(reference.rmsnorm_act_quant, args),
            },
            baseline="reference",
            nbytes=x.nbytes + 4 * k + n * k + 4 * n,
            memory_bound=True,
            device=s.device,
        )


@register("ternary_quant", gpu=True)
def gpu_ternary_quant_cases(s: Settings) -> Iterator[Case]:
    ob = onebitllms_kernels()
    for k, m in SHAPES_KM:
        w = weight(m, k).w.to(s.device)  # the float32 master weight
        providers = {
            "wrinklefree": Provider(ops.ternary_quant, (w,)),
            "reference": Provider(reference.ternary_quant, (w,)),
        }
        if ob is not None:
            providers["onebitllms"] = Provider(ob.weight_quant_triton, (w,), nbytes=3 * w.nbytes)
        yield Case(
            kernel="ternary_quant",
            shape={"K": k, "M": m},
            providers=providers,
            baseline="reference",
            nbytes=w.nbytes + m * k + 4,  # counted for one read of w, as on the CPU
            memory_bound=True,
            device=s.device,
        )


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)  # cuBLAS: a GEMV at one row


@register("i2s_matmul", gpu=True)
def gpu_i2s_matmul_cases(s: Settings) -> Iterator[Case]:
    for k, m in SHAPES_KM:
        wt = weight(m, k)
        packed, w16 = wt.packed.to(s.device), wt.w.to(s.device, torch.bfloat16)
        for n in BATCHES:
            x = activations(n, k)
            q, x_scale = (t.to(s.device) for t in ops.act_quant_int8(x))
            x16 = x.to(s.device, torch.bfloat16)
            yield Case(
                kernel="i2s_matmul",
                shape={"N": n, "K": k, "M": m},
                providers={
                    "wrinklefree": Provider(ops.i2s_matmul, (q, x_scale, packed, m)),
                    "torch_bf16": Provider(
                        bf16_linear, (x16, w16), nbytes=2 * (n * k + m * k + n * m), stream_bytes=2 * m * k
                    ),
                },
                baseline="torch_bf16",
                nbytes=packed.numel() + n * k + 4 * n + 4 * n * m,
                macs=n * m * k,
                memory_bound=n == 1,
                stream_bytes=m * k // 4,
                device=s.device,
            )


def tiny_model_shape() -> dict:
    """The LlamaConfig arguments of configs/model/tiny.yaml, with the built-in tokenizer's vocabulary."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    configs = files("wrinklefree.configs")
    shape = OmegaConf.to_container(OmegaConf.create((configs / "model" / "tiny.yaml").read_text()).config)
    if shape.pop("model_type") != "llama":
        raise ValueError("configs/model/tiny.yaml is no longer a llama; update the train_step bench")
    vocab = OmegaConf.create((configs / "data" / "builtin.yaml").read_text()).vocab_size
    return {**shape, "vocab_size": vocab}


@register("train_step")
def train_step_cases(s: Settings) -> Iterator[Case]:
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: only when asked for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = "torch_bf16" if device == "cuda" else "torch_fp32"  # what autocast runs on CUDA
    batches = TRAIN_STEP_BATCH_CUDA if device == "cuda" else TRAIN_STEP_BATCH_CPU
    names = ["tiny"] if s.quick else ["tiny", *TRAIN_STEP_MODELS]
    for name in names:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            shape = tiny_model_shape() if name == "tiny" else TRAIN_STEP_MODELS[name]
            full = LlamaForCausalLM(LlamaConfig(**shape))
        # fully quantized (no schedule), from a copy holding the same weights
        bitnet = wrinklefree.convert(copy.deepcopy(full), subln="standard", activation="relu2")
        b, t = batches[name]
        g = torch.Generator().manual_seed(b * 100_003 + t)
        input_ids = torch.randint(0, full.config.vocab_size, (b, t), generator=g).to(device)
        linear_weights = sum(m.weight.numel() for m in full.modules() if isinstance(m, nn.Linear))
        providers = {}
        for provider, model in (("wrinklefree", bitnet), (baseline, full)):
            model.to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # its state fills on the untimed call
            providers[provider] = Provider(train_step, (model, optimizer, input_ids))
        yield Case(
            kernel="train_step",
            shape={"model": name, "B": b, "T": t},
            providers=providers,
            baseline=baseline,
            nbytes=None,
            # the linear layers' (head included) forward, dx and dW; attention's matmuls not counted
            macs=3 * b * t * linear_weights,
            mode="full",
            device=device,
            tokens=b * t,
            min_reps=3 if name == "smollm2_135m" else None,  # a CPU step takes ~3 s
        )


GPU_REGISTRY["bitlinear_train"] = bitlinear_train_cases  # both pick CUDA when it is there
GPU_REGISTRY["train_step"] = train_step_cases


def _activation_ks() -> list[int]:
    return sorted({k for k, _ in SHAPES_KM})


@register("act_quant_int8")
def act_quant_cases(s: Settings) -> Iterator[Case]:
    for k in _activation_ks():
        for n in BATCHES:
            x = activations(n, k)
            yield Case(
                kernel="act_quant_int8",
                shape={"N": n, "K": k},
                providers={
                    "wrinklefree": Provider(ops.act_quant_int8, (x,), rotate=(0,)),
                    "reference": Provider(reference.act_quant_int8, (x,), rotate=(0,)),
                },
                baseline="reference",
                nbytes=4 * n * k + n * k + 4 * n,
                memory_bound=True,
            )


@register("rmsnorm_act_quant")
def rmsnorm_act_quant_cases(s: Settings) -> Iterator[Case]:
    for k in _activation_ks():
        gain = torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5
        for n in BATCHES:
            args = (activations(n, k), gain, 1e-5)
            yield Case(
                kernel="rmsnorm_act_quant",
                shape={"N": n, "K": k},
                providers={
                    "wrinklefree": Provider(ops.rmsnorm_act_quant, args, rotate=(0,)),
                    "reference": Provider(reference.rmsnorm_act_quant, args, rotate=(0,)),
                },
                baseline="reference",
                nbytes=4 * n * k + 4 * k + n * k + 4 * n,
                memory_bound=True,
            )


@register("ternary_quant")
def ternary_quant_cases(s: Settings) -> Iterator[Case]:
    for k, m in SHAPES_KM:
        w = weight(m, k).w
        yield Case(
            kernel="ternary_quant",
            shape={"K": k, "M": m},
            providers={
                "wrinklefree": Provider(ops.ternary_quant, (w,), rotate=(0,)),
                "reference": Provider(reference.ternary_quant, (w,), rotate=(0,)),
            },
            baseline="reference",
            nbytes=4 * m * k + m * k + 4,
            memory_bound=True,
        )


@register("pack")
def pack_cases(s: Settings) -> Iterator[Case]:
    for fmt in s.formats:
        for k, m in SHAPES_KM:
            wt = weight(m, k)
            args = (wt.codes, wt.scale, fmt)
            yield Case(
                kernel="pack",
                shape={"K": k, "M": m, "fmt": fmt},
                providers={
                    "wrinklefree": Provider(ops.pack, args, rotate=(0,)),
                    "reference": Provider(reference.pack, args, rotate=(0,)),
                },
                baseline="reference",
                nbytes=m * k + packed_bytes(fmt, m, k),
                memory_bound=True,
            )


@register("unpack")
def unpack_cases(s: Settings) -> Iterator[Case]:
    for fmt in s.formats:
        for k, m in SHAPES_KM:
            wt = weight(m, k)
            buf = wt.packed if fmt == "i2_s" else ops.pack(wt.codes, wt.scale, fmt)
            scale_bytes = 4 if ops.FORMATS[fmt].tensor_scale else 4 * m * k // ops.FORMATS[fmt].block_values
            yield Case(
                kernel="unpack",
                shape={"K": k, "M": m, "fmt": fmt},
                providers={
                    "wrinklefree": Provider(ops.unpack, (buf, (m, k), fmt), rotate=(0,)),
                    "reference": Provider(reference.unpack, (buf, (m, k), fmt), rotate=(0,)),
                },
                baseline="reference",
                nbytes=buf.numel() + m * k + scale_bytes,
                memory_bound=True,
            )


# ---- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int
    copies: int
    touched_bytes: int  # bytes of rotated operands one cycle over the copies reads


def operand_bytes(a: torch.Tensor | nn.Module) -> int:
    if isinstance(a, nn.Module):
        return sum(t.nbytes for t in (*a.parameters(), *a.buffers()))
    return a.nbytes


def operand_copy(a: torch.Tensor | nn.Module) -> torch.Tensor | nn.Module:
    return copy.deepcopy(a) if isinstance(a, nn.Module) else a.clone()


def rotated_args(p: Provider) -> tuple[list[tuple], int]:
    if not p.rotate:
        return [p.args], 0
    per_copy = sum(operand_bytes(p.args[i]) for i in p.rotate)
    n = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / per_copy)))
    sets = [p.args] + [
        tuple(operand_copy(a) if i in p.rotate else a for i, a in enumerate(p.args)) for _ in range(n - 1)
    ]
    return sets, n * per_copy


def time_provider_cuda(p: Provider, s: Settings) -> Timing:
    """GPU timing with Triton's do_bench: CUDA events around each call, and the L2 cache flushed
    between calls, so every call reads its operands from HBM (no copies to rotate)."""
    from triton.testing import do_bench

    rep_ms = 1000 * s.budget_s
    median, p20, p80 = do_bench(lambda: p.fn(*p.args), warmup=1000 * s.warmup_s, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    reps = max(1, int(rep_ms / max(median, 1e-6)))  # about what do_bench ran
    return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, reps, 1, 0)


def time_provider(p: Provider, s: Settings, device: str = "cpu") -> Timing:
    if device == "cuda":
        return time_provider_cuda(p, s)
    sets, touched = rotated_args(p)
    n = len(sets)

    def call(i: int) -> None:
        p.fn(*sets[i % n])
        if device == "cuda":
            torch.cuda.synchronize()  # a call ends when its GPU work does, not when it is queued

    # The first call pays one-off costs (torch imports its compile machinery on a custom op's first
    # call, ~1 s; output pages fault in), so it neither counts nor serves as the estimate, unless
    # it is already slower than the whole budget.
    t0 = time.perf_counter()
    call(0)
    est = time.perf_counter() - t0
    i = 1
    if est < s.budget_s:
        t0 = time.perf_counter()
        call(i)
        est = time.perf_counter() - t0
        i += 1
        for _ in range(min(n, int(s.warmup_s / max(est, 1e-9)))):
            call(i)
            i += 1
    # max_reps bounds the Python loop; a C++ timer runs its calls back to back, so there the budget
    # alone bounds them (a decode matmul takes ~15 us: 200 calls would be 3 ms, at the mercy of one
    # noisy millisecond of the VM)
    cap = s.max_reps if p.timer is None else 10 * s.max_reps
    reps = max(s.min_reps, min(cap, int(s.budget_s / max(est, 1e-9))))
    if p.timer is not None:
        rotated = sets[i % n :] + sets[: i % n]  # go on where the warm-up stopped
        times = p.timer(rotated, reps)
    else:
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            call(i + r)
            times.append(time.perf_counter() - t0)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7], reps, n, touched)


def probe_bandwidth(s: Settings) -> float:
    return ops.read_bandwidth(BW_PROBE_BYTES, s.probe_reps)


@functools.cache
def hbm_probe_buffer() -> torch.Tensor:
    """The probe's HBM_PROBE_BYTES of float32, made once per run (every memory-bound case probes twice)."""
    return torch.ones(HBM_PROBE_BYTES // 4, dtype=torch.float32, device="cuda")


def probe_hbm_bandwidth(s: Settings) -> float:
    """The GPU's read bandwidth in bytes/s: torch's sum over HBM_PROBE_BYTES of float32, a
    read-only pass, timed with CUDA events (best of probe_reps)."""
    buf = hbm_probe_buffer()
    buf.sum()
    best = 0.0
    for _ in range(max(s.probe_reps, 3)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        buf.sum()
        end.record()
        end.synchronize()
        best = max(best, HBM_PROBE_BYTES / (start.elapsed_time(end) / 1e3))
    return best


# ---- running ----------------------------------------------------------------------------------


def run_case(case: Case, s: Settings, int8_peak: float) -> list[dict]:
    names = [name for name, p in case.providers.items() if not (s.quick and p.slow)]
    # Ours is timed between two bandwidth probes, since the VM's bandwidth drifts by minutes.
    order = sorted(names, key=lambda name: not name.startswith("wrinklefree"))
    timings: dict[str, Timing] = {}
    settings = replace(s, min_reps=case.min_reps) if case.min_reps else s
    probes: list[float] = []
    probe = probe_hbm_bandwidth if case.device == "cuda" else probe_bandwidth
    for name in order:
        ours = case.memory_bound and name.startswith("wrinklefree")
        if ours:
            probes.append(probe(s))
        timings[name] = time_provider(case.providers[name], settings, case.device)
        if ours:
            probes.append(probe(s))
    bw = statistics.mean(probes) if probes else None

    base = timings.get(case.baseline)
    rows = []
    for name in names:
        p, t = case.providers[name], timings[name]
        nbytes = p.nbytes if p.nbytes is not None else case.nbytes
        stream = p.stream_bytes if p.stream_bytes is not None else (case.stream_bytes or nbytes)
        rows.append(
            {
                "kernel": case.kernel,
                "provider": name,
                "mode": case.mode,
                "device": case.device,
                "shape": case.shape,
                "median_ms": t.median_s * 1e3,
                "p20_ms": t.p20_s * 1e3,
                "p80_ms": t.p80_s * 1e3,
                "reps": t.reps,
                "copies": t.copies,
                "touched_mb": t.touched_bytes / 1e6,
                "bytes": nbytes,
                "gb_per_s": nbytes / t.median_s / 1e9 if nbytes is not None else None,
                "tokens": case.tokens,
                "tokens_per_s": case.tokens / t.median_s if case.tokens else None,
                "gmac_per_s": case.macs / t.median_s / 1e9 if case.macs else None,
                # compute ceiling: the int8 multiply-add instruction's peak measured in this run
                "pct_int8_peak": 100 * case.macs / t.median_s / int8_peak
                if case.int8_matmul and name != "torch_fp32"
                else None,
                "stream_bytes": stream if case.memory_bound else None,
                "stream_gb_per_s": stream / t.median_s / 1e9 if case.memory_bound else None,
                "read_bw_gb_per_s": bw / 1e9 if bw else None,
                "read_bw_probes_gb_per_s": [b / 1e9 for b in probes] if probes else None,
                "pct_read_bw": 100 * stream / t.median_s / bw if bw else None,
                "baseline": case.baseline,
                # speedup of this row's provider over the baseline (> 1: faster), medians of this run
                "ratio": base.median_s / t.median_s if base else None,
            }
        )
    return rows


def call_overhead_us(s: Settings) -> dict[str, float]:
    """Median time of the smallest legal calls: the fixed cost every op call pays."""
    wt_codes, wt_scale = ops.ternary_quant(torch.ones(8, 128))
    packed = ops.pack(wt_codes, wt_scale, "i2_s")
    q, x_scale = ops.act_quant_int8(torch.ones(1, 128))
    w = torch.ones(8, 128)
    tiny = replace(s, budget_s=0.05)
    return {
        "i2s_matmul": time_provider(Provider(ops.i2s_matmul, (q, x_scale, packed, 8)), tiny).median_s * 1e6,
        "torch_fp32_matmul": time_provider(Provider(fp32_matmul, (torch.ones(1, 128), w)), tiny).median_s * 1e6,
    }


def evaluate_targets(rows: list[dict]) -> list[dict]:
    ours = [r for r in rows if r["provider"] in ("wrinklefree", "wrinklefree_core")]
    targets = []

    def add(
        name: str,
        row: dict,
        value: float | None,
        goal: float | None,
        unit: str,
        judged: bool = True,
        note: str = "",
        at_most: bool = False,  # the goal is a ceiling (times), not a floor
    ) -> None:
        met = None
        if judged:
            met = value is not None and (value <= goal if at_most else value >= goal)
        targets.append(
            {
                "target": name,
                "kernel": row["kernel"],
                "shape": row["shape"],
                "device": row["device"],
                "value": value,
                "goal": goal,
                "goal_op": "<=" if at_most else ">=",
                "unit": unit,
                "met": met,
                "note": note,
            }
        )

    for r in ours:
        core = r["provider"] == "wrinklefree_core"
        if r["device"] == "cuda" and r["kernel"] in ("act_quant_int8", "rmsnorm_act_quant", "ternary_quant"):
            add("quant bandwidth (HBM)", r, r["pct_read_bw"], 100 * GPU_QUANT_BW_SHARE, "% of HBM read BW")
            continue
        if r["device"] == "cuda" and r["kernel"] == "i2s_matmul":
            if r["shape"]["N"] == 1:
                add("decode GEMV vs cuBLAS", r, r["ratio"], GEMV_VS_CUBLAS, "x cuBLAS bf16 GEMV")
                add("decode GEMV streaming", r, r["pct_read_bw"], None, "% of HBM read BW", False, "(the ceiling)")
            else:
                add("prefill GEMM vs cuBLAS", r, r["ratio"], None, "x cuBLAS bf16", False, "(reported)")
            continue
        # The matmul's throughput is judged on the kernel itself, as the inference engine calls
        # it; the op adds a fixed Python cost per call (meta.call_overhead_us) and allocates its
        # output. The ratio to torch is judged on the op, which pays what torch's matmul pays.
        if r["kernel"] == "i2s_matmul" and r["shape"]["N"] == 1:
            if core:
                add("decode weight streaming", r, r["pct_read_bw"], 100 * DECODE_BW_SHARE, "% of read BW")
            else:
                add("decode, through the op", r, r["pct_read_bw"], None, "% of read BW", False, "(with call cost)")
        elif r["kernel"] == "i2s_matmul" and core:
            add("prefill throughput", r, r["gmac_per_s"], PREFILL_GMACS, "G multiply-adds/s")
            add("prefill share of peak", r, r["pct_int8_peak"], None, "% of int8 MAC peak", False, "(the ceiling)")
        elif core:
            continue
        elif r["kernel"] == "i2s_matmul":
            add("prefill, through the op", r, r["gmac_per_s"], None, "G multiply-adds/s", False, "(with call cost)")
            add("prefill vs torch fp32", r, r["ratio"], PREFILL_VS_FP32, "x torch fp32")
        elif r["kernel"] == "bitlinear_packed" and r["shape"]["N"] == 1:
            add("decode, through BitLinear", r, r["pct_read_bw"], None, "% of read BW", False, "(with layer cost)")
        elif r["kernel"] == "bitlinear_train":
            on_gpu = r["device"] == "cuda"
            add(
                "train fwd+bwd time",
                r,
                1 / r["ratio"],
                TRAIN_TIME_VS_LINEAR,
                "x Linear's time",
                on_gpu,
                "" if on_gpu else "n/a on CPU (a GPU target, vs bf16)",
                at_most=True,
            )
        elif r["kernel"] == "train_step":
            on_gpu = r["device"] == "cuda"
            add(
                "training step",
                r,
                1 / r["ratio"],
                TRAIN_STEP_VS_FULL,
                "x full precision",
                on_gpu,
                "" if on_gpu else "n/a on CPU (a GPU target, vs bf16)",
                at_most=True,
            )
        elif r["kernel"] in ("act_quant_int8", "rmsnorm_act_quant", "ternary_quant"):
            judged = r["bytes"] >= MIN_BW_TARGET_BYTES
            add(
                "quant bandwidth",
                r,
                r["pct_read_bw"],
                100 * QUANT_BW_SHARE,
                "% of read BW",
                judged,
                "" if judged else "n/a (< 1 MiB per call: call-overhead bound)",
            )
    # onebitllms, where it ran beside us: our speed over theirs, reported
    theirs = {(r["kernel"], shape_text(r["shape"])): r for r in rows if r["provider"] == "onebitllms"}
    for r in ours:
        other = theirs.get((r["kernel"], shape_text(r["shape"])))
        if other is not None:
            add("vs onebitllms", r, other["median_ms"] / r["median_ms"], None, "x onebitllms's speed", False, "")
    return targets


# ---- output -----------------------------------------------------------------------------------


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def fmt_num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_header() -> None:
    print(
        f"{'kernel':<18} {'provider':<12} {'shape':<28} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} "
        f"{'GB/s':>7} {'G MAC/s':>8} {'read BW':>8} {'% BW':>6} {'ratio':>8}",
        flush=True,
    )


def print_row(r: dict) -> None:
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(
        f"{r['kernel']:<18} {r['provider']:<12} {shape_text(r['shape']):<28} "
        f"{r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} {r['p80_ms']:>9.4f} "
        f"{fmt_num(r['gb_per_s'], '7.2f'):>7} {fmt_num(r['gmac_per_s'], '8.1f'):>8} "
        f"{fmt_num(r['read_bw_gb_per_s'], '8.1f'):>8} {fmt_num(r['pct_read_bw'], '5.1f'):>6} {ratio:>8}"
        + (f" {r['tokens_per_s']:>9.0f} tok/s" if r.get("tokens_per_s") else ""),
        flush=True,
    )


def print_targets(targets: list[dict]) -> None:
    print("\nTargets (DESIGN.md section 6; reported, not asserted):")
    for t in targets:
        verdict = {True: "MET", False: "not met", None: t["note"]}[t["met"]]
        goal = f"vs {t['goal_op']} {t['goal']:g}" if t["goal"] is not None else "  " + " " * 6
        print(
            f"  {t['target']:<26} {t['kernel']:<18} {shape_text(t['shape']):<28} "
            f"{fmt_num(t['value'], '8.2f')} {goal} {t['unit']:<18} {verdict}"
        )
    judged = [t for t in targets if t["met"] is not None]
    print(f"  {sum(t['met'] for t in judged)} of {len(judged)} judged targets met")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="few reps, no int64 reference matmul, i2_s only, train_step on tiny only (< 60 s)",
    )
    ap.add_argument(
        "--out", "--json", dest="out", help="JSON output path (default bench/out/kernels.json; --e2e: e2e-<model>.json)"
    )
    ap.add_argument("--threads", type=int, help="kernel threads (torch gets the same); default: all CPUs")
    ap.add_argument("--isa", choices=["avx512", "avx2", "scalar"], help="force the kernels' instruction set")
    ap.add_argument(
        "--kernels",
        help=f"comma-separated subset of: {', '.join(REGISTRY)}; with --gpu: {', '.join(GPU_REGISTRY)}",
    )
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="the CUDA suite instead: Triton quantizers against the HBM bandwidth, the I2_S GEMV/GEMM against "
        "cuBLAS bf16, BitLinear training and the training step against bf16 (default out: bench/out/gpu.json)",
    )
    ap.add_argument(
        "--e2e",
        nargs="?",
        const="2b4t",
        choices=["2b4t", "small"],
        help="instead of the kernels: end-to-end inference, our engine against llama.cpp (bench/e2e.py) on a random "
        "model of the 2B4T shape, or a small one to check the plumbing; --threads defaults to 2 there",
    )
    args = ap.parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= ops.MAX_THREADS:
        ap.error(f"--threads must be in [1, {ops.MAX_THREADS}], got {args.threads}")
    if args.kernels is not None and not [k for k in args.kernels.split(",") if k.strip()]:
        ap.error("--kernels names no kernel")
    if args.out is not None:
        out = Path(args.out)
        if not args.out.strip() or out.is_dir():
            ap.error(f"--out must be a file path, got {args.out!r}")
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            ap.error(f"--out: {parent} is a file, so {args.out} cannot be created")
    if args.e2e:
        ignored = [f"--{name}" for name in ("quick", "kernels", "isa", "gpu") if getattr(args, name)]
        if ignored:
            ap.error(f"--e2e runs bench/e2e.py, which takes --threads and --out only, not {' '.join(ignored)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.e2e:
        import e2e  # bench/e2e.py, beside this file

        e2e.main(["--shape", args.e2e, "--threads", str(args.threads or 2)] + (["--out", args.out] if args.out else []))
        return
    if args.threads is not None:
        ops.set_num_threads(args.threads)
    if args.isa:
        ops.set_isa(args.isa)
    # torch's matmul is the baseline, so it gets exactly the threads our kernels get
    torch.set_num_threads(ops.get_num_threads())

    registry = GPU_REGISTRY if args.gpu else REGISTRY
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
    kernels = list(registry)
    if args.kernels:
        kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
        unknown = [k for k in kernels if k not in registry]
        if unknown:
            sys.exit(f"unknown kernels {unknown}; choose from {list(registry)}")

    if args.quick:
        s = Settings(quick=True, budget_s=0.1, warmup_s=0.02, min_reps=3, max_reps=200, probe_reps=2)
    else:
        s = Settings(
            quick=False,
            budget_s=1.0,
            warmup_s=0.2,
            min_reps=5,
            max_reps=2000,
            probe_reps=3,
            formats=("i2_s", "tq2_0", "tq1_0"),
        )
    if args.gpu:
        s = replace(s, device="cuda")

    start = time.perf_counter()
    bw_start = probe_bandwidth(replace(s, probe_reps=5))
    int8_peak = ops.int8_mac_rate(0.2 if s.quick else 0.5)
    meta = {
        "cpu": cpu_model(),
        "isa": ops.get_isa(),
        "supported_isas": ops.supported_isas(),
        "threads": ops.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "wrinklefree_version": wrinklefree.__version__,
        "torch_version": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": s.quick,
        "read_bw_gb_per_s": bw_start / 1e9,
        "int8_peak_gmac_per_s": int8_peak / 1e9,
        "read_bw_probe_bytes": BW_PROBE_BYTES,
        "rotate_bytes": ROTATE_BYTES,
        "call_overhead_us": call_overhead_us(replace(s, device="cpu")),
        "hbm_read_bw_gb_per_s": probe_hbm_bandwidth(s) / 1e9 if args.gpu else None,
    }
    gpu = f" | {meta['cuda_device']}" if meta["cuda_device"] else ""
    if meta["hbm_read_bw_gb_per_s"]:
        gpu += f" (HBM read {meta['hbm_read_bw_gb_per_s']:.0f} GB/s)"
    print(
        f"{meta['cpu']} | isa {meta['isa']} | {meta['threads']} threads | wrinklefree {meta['wrinklefree_version']}"
        f" | torch {meta['torch_version']}{gpu} | read BW {meta['read_bw_gb_per_s']:.1f} GB/s"
        f" | int8 MAC peak {meta['int8_peak_gmac_per_s']:.0f} G/s"
        f" | op call overhead {meta['call_overhead_us']['i2s_matmul']:.1f} us"
        f" (torch matmul {meta['call_overhead_us']['torch_fp32_matmul']:.1f} us)\n"
        "ratio = speedup over the case's baseline (torch's matmul or nn.Linear for matmuls and BitLinear, "
        "the unconverted model for train_step, reference otherwise); "
        "% BW = share of the read bandwidth probed beside the timing (N=1 matmuls: packed weight bytes only;\n"
        "elsewhere inputs + outputs, so a kernel writing more than it reads, like unpack, can pass 100)\n"
    )
    print_header()

    rows: list[dict] = []
    for kernel in kernels:
        for case in registry[kernel](s):
            for row in run_case(case, s, int8_peak):
                print_row(row)
                rows.append(row)

    targets = evaluate_targets(rows)
    print_targets(targets)
    probes = [b for r in rows if r["provider"] == "wrinklefree" for b in (r["read_bw_probes_gb_per_s"] or [])]
    meta["read_bw_probes_gb_per_s"] = {
        "min": min(probes, default=None),
        "median": statistics.median(probes) if probes else None,
        "max": max(probes, default=None),
        "count": len(probes),
    }
    meta["wall_s"] = time.perf_counter() - start

    out = Path(args.out or ("bench/out/gpu.json" if args.gpu else "bench/out/kernels.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1) + "\n")
    print(f"\nwrote {out} ({len(rows)} rows) in {meta['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
