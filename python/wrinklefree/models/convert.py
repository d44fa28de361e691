"""Convert a Hugging Face Llama-family model to BitNet in place (DESIGN.md section 4).

Every nn.Linear except the output head becomes a :class:`~wrinklefree.nn.BitLinear` that shares
the original parameters (no copy, so this works on the meta device and before FSDP2 sharding);
SubLN goes before o_proj and down_proj ("standard") or before every BitLinear ("allnorm"); the
FFN activation can stay or become relu2. A relu2 FFN (set here or by the model's config) computes
``relu(gate)^2 * up`` with the fused :func:`wrinklefree.ops.relu2_glu`. The settings are recorded
in ``model.config.wrinklefree`` so that a saved model can be rebuilt.
"""

from __future__ import annotations

import copy
import fnmatch
import types
from dataclasses import asdict, dataclass, field

from torch import Tensor, nn

from wrinklefree import ops
from wrinklefree.nn import BitLinear, BitLinearLRC, QSparse, QuantSchedule, TopKRouter, bitlinear_modules
from wrinklefree.nn.bitlinear import lrc_rank as lrc_rank_of

#: model_type -> the family name users know it by
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama (SmolLM2, Llama 2/3)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "bitnet": "transformers BitNet",
}
SUBLN_MODES = ("standard", "allnorm", "none")
ACTIVATIONS = ("keep", "relu2")
SUBLN_TARGETS = ("o_proj", "down_proj")  # the projections "standard" SubLN goes in front of


@dataclass
class ConvertConfig:
    """What :func:`convert` did; stored as ``model.config.wrinklefree``."""

    subln: str = "standard"
    activation: str = "keep"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    lrc_rank: int | float | None = None
    qsparse: dict | None = None

    def __post_init__(self) -> None:
        if self.subln not in (*SUBLN_MODES, "builtin"):  # builtin: the model's own SubLNs (BitNet)
            raise ValueError(f"convert: subln must be one of {SUBLN_MODES}, got {self.subln!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"convert: activation must be one of {ACTIVATIONS}, got {self.activation!r}")


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt is None:
        raise TypeError(
            f"convert: expected a Hugging Face transformers model (with .config.model_type), got "
            f"{type(model).__name__}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return mt


def _skipped(name: str, skip: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in skip)


def convert(
    model: nn.Module,
    *,
    subln: str | bool = "standard",
    activation: str = "keep",
    skip: str | list[str] | tuple[str, ...] | None = ("lm_head",),
    inplace: bool = True,
    schedule: QuantSchedule | None = None,
    lrc_rank: int | float | None = None,
    qsparse: QSparse | dict | None = None,
) -> nn.Module:
    """Turn a Hugging Face Llama/Qwen2/Qwen3/Mistral causal LM into a BitNet model.

    Args:
        model: a transformers model (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ... or the bare
            decoder); any device, including meta.
        subln: "standard" (SubLN before o_proj and down_proj), "allnorm" (before every
            BitLinear) or "none"; True/False mean "standard"/"none".
        activation: "keep" the model's FFN activation or use "relu2" (BitNet's ``relu(x)^2``).
        skip: module names (or glob patterns on the full or last name) left as nn.Linear: a
            list, one string, or None for none; the output head and MoE router gates are always kept.
        inplace: convert ``model`` itself (True) or a deep copy (False).
        schedule: the quantization warm-up schedule every layer reads; None: fully quantized.
        lrc_rank: add a low-rank correction (:class:`~wrinklefree.nn.BitLinearLRC`) of this
            rank (int, or fraction of min(in, out)) to every BitLinear.
        qsparse: Q-Sparse for every BitLinear input: a :class:`~wrinklefree.nn.QSparse` (its
            settings are copied per layer) or a dict of its arguments.
    Returns:
        the converted model (``model`` itself when ``inplace``).
    Raises:
        ValueError, TypeError: a bad option (naming it), checked for every layer before any is replaced.

    On the meta device, the parameters it adds (SubLN gains, LRC factors) are initialized by
    :func:`~wrinklefree.nn.reset_added_parameters` once the model is materialized (``to_empty``).
    """
    mt = model_type(model)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"convert: unsupported architecture {mt!r}; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        )
    if isinstance(subln, bool):
        subln = "standard" if subln else "none"
    qs_args = _qsparse_args(qsparse)
    qs = QSparse(**qs_args) if qs_args is not None else None
    if schedule is not None and not isinstance(schedule, QuantSchedule):
        raise TypeError(f"convert: schedule must be a QuantSchedule or None, got {type(schedule).__name__}")
    cfg = ConvertConfig(subln, activation, _skip_list(skip), lrc_rank, qs_args)
    if any(True for _ in bitlinear_modules(model)):
        raise ValueError("convert: the model already holds BitLinear layers (converted twice?)")
    if not inplace:
        model = copy.deepcopy(model)

    config = model.config
    eps = getattr(config, "rms_norm_eps", 1e-5)
    if mt == "bitnet":  # transformers' BitNet already has its SubLNs (attn_sub_norm, ffn_sub_norm)
        if cfg.subln == "allnorm":
            raise ValueError("convert: subln='allnorm' is not available for a transformers BitNet model")
        cfg.subln = "builtin"
    head = _output_head(model)
    gates = {id(m.gate) for m in model.modules() if isinstance(m, TopKRouter)}  # routing stays full precision
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and id(module) not in gates and not _skipped(name, cfg.skip)
    ]
    for name, module in targets:  # every layer's options hold before the first is replaced
        if lrc_rank is not None:
            try:
                lrc_rank_of(lrc_rank, module.in_features, module.out_features)
            except (TypeError, ValueError) as e:
                shape = f"[{module.out_features}, {module.in_features}]"
                raise type(e)(f"convert: lrc_rank for {name} {shape}: {e}") from None
        if qs is not None:
            qs.check_input_size(module.in_features, name, prefix="convert: qsparse")
    for name, module in targets:
        leaf = name.rsplit(".", 1)[-1]
        norm = cfg.subln == "allnorm" or (cfg.subln == "standard" and leaf in SUBLN_TARGETS)
        layer = BitLinear.from_linear(module, subln=norm, subln_eps=eps, schedule=schedule)
        if qs_args is not None:
            layer.qsparse = QSparse(**qs_args, schedule=schedule)
        if lrc_rank is not None:
            layer = BitLinearLRC.from_bitlinear(layer, lrc_rank)
        model.set_submodule(name, layer)

    if cfg.activation == "relu2":
        _set_activation(model, "relu2")
    fuse_relu2_glu(model)
    config.wrinklefree = asdict(cfg)
    return model


# FFN classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)), with the BitNet
# model's ffn_sub_norm in front of down_proj: those the fused forward below reproduces.
_GLU_FFNS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "BitNetMLP")


def _relu2_glu_ffn_forward(self: nn.Module, x: Tensor) -> Tensor:
    h = ops.relu2_glu(self.gate_proj(x), self.up_proj(x))
    sub_norm = getattr(self, "ffn_sub_norm", None)
    return self.down_proj(sub_norm(h) if sub_norm is not None else h)


def fuse_relu2_glu(model: nn.Module) -> int:
    """Give every relu2 gated FFN of ``model`` a forward that computes ``relu(gate)^2 * up`` in one
    :func:`wrinklefree.ops.relu2_glu` (one kernel on GPU, forward and backward, and only gate and up
    kept for the backward). The same values: the op computes in float32, so in float32 the result
    is bitwise the unfused one. Parameters and state-dict keys are unchanged. Returns the number
    of FFNs fused."""
    from transformers.activations import ReLUSquaredActivation

    fused = 0
    for module in model.modules():
        if type(module).__name__ in _GLU_FFNS and isinstance(getattr(module, "act_fn", None), ReLUSquaredActivation):
            module.forward = types.MethodType(_relu2_glu_ffn_forward, module)
            fused += 1
    return fused


def _skip_list(skip) -> list[str]:
    if skip is None:
        return []
    if isinstance(skip, str):
        return [skip]
    if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
        raise TypeError(f"convert: skip must be a module name, a list of names or None, got {skip!r}")
    return list(skip)


def _qsparse_args(qsparse: QSparse | dict | None) -> dict | None:
    if qsparse is None:
        return None
    if isinstance(qsparse, QSparse):
        return {
            "ratio": qsparse.ratio,
            "mode": qsparse.mode,
            "block_size": qsparse.block_size,
            "warmup_steps": qsparse.warmup_steps,
        }
    if isinstance(qsparse, dict):
        QSparse(**qsparse)  # validates the keys and values
        return dict(qsparse)
    raise TypeError(f"convert: qsparse must be a QSparse, a dict or None, got {type(qsparse).__name__}")


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _set_activation(model: nn.Module, name: str) -> None:
    from transformers.activations import ACT2FN

    found = False
    for module in model.modules():
        if hasattr(module, "act_fn") and hasattr(module, "down_proj"):
            module.act_fn = ACT2FN[name]
            found = True
    if not found:
        raise ValueError("convert: activation='relu2' found no FFN (a module with act_fn and down_proj)")
    model.config.hidden_act = name
