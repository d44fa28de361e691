"""transformers `bitnet` checkpoints: save our models in that format and load them back.

The format (transformers' BitNetForCausalLM, the one microsoft/bitnet-b1.58-2B-4T uses):
config.json with ``model_type: bitnet`` and a ``quantization_config`` (quant_method "bitnet"),
and safetensors weights in which each quantized projection is either

* packed (``linear_class: bitlinear``, ``quantization_mode: offline``): ``weight`` uint8
  [out/4, in], 2-bit codes ``value + 1`` where row ``i * out/4 + r`` sits at bits ``2i..2i+1`` of
  packed row ``r``; and ``weight_scale`` [1] holding ``1 / s`` (the forward divides by it); or
* latent (``linear_class: autobitlinear``, ``quantization_mode: online``): the full-precision
  weight, quantized on the fly with the same absmean/absmax formulas as ours.

Our side of the format is a transformers BitNetForCausalLM whose projections are our BitLinear
(:func:`load_bitnet`). A converted Llama/Qwen2/Mistral model saves to it when it has the same
structure: SubLN before o_proj and down_proj ("standard"), no q/k norms, heads * head_dim ==
hidden size, no LRC or Q-Sparse (transformers' BitNet has neither).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wrinklefree.atomic import atomic_path, atomic_write_text
from wrinklefree.models.convert import convert, model_type
from wrinklefree.nn import BitLinear, BitLinearLRC, QuantSchedule, bitlinear_modules

_SUBLN_KEYS = {"self_attn.o_proj": "self_attn.attn_sub_norm", "mlp.down_proj": "mlp.ffn_sub_norm"}
_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
)
VALUES_PER_BYTE = 4


# ---- the packed layout --------------------------------------------------------------------------


def pack_hf_ternary(codes: Tensor) -> Tensor:
    """int8 codes [out, in] in {-1, 0, 1} -> transformers' packed uint8 [ceil(out/4), in]."""
    out_features = codes.shape[0]
    rows = -(-out_features // VALUES_PER_BYTE)
    u = (codes.to(torch.int16) + 1).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, 0, 0, rows * VALUES_PER_BYTE - out_features))
    packed = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        packed |= u[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_hf_ternary(packed: Tensor, out_features: int) -> Tensor:
    """transformers' packed uint8 [ceil(out/4), in] -> int8 codes [out, in] in {-1, 0, 1}."""
    rows = packed.shape[0]
    if rows != -(-out_features // VALUES_PER_BYTE):
        raise ValueError(f"packed weight has {rows} rows; out_features={out_features} needs {-(-out_features // 4)}")
    parts = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(parts, dim=0)[:out_features].to(torch.int8) - 1
    if (codes > 1).any():
        raise ValueError("packed weight holds the unused code 3: not a ternary bitnet checkpoint")
    return codes


# ---- export -------------------------------------------------------------------------------------


def bitnet_config(model: nn.Module, *, packed: bool = True):
    """The transformers BitNetConfig describing ``model`` (a converted model or one of ours)."""
    from transformers import BitNetConfig

    src = model.config
    mt = model_type(model)
    conv = getattr(src, "wrinklefree", None)
    if conv is None:
        raise ValueError("save_bitnet: the model is not converted; call wrinklefree.convert(model) first")
    if mt != "bitnet":
        if conv["subln"] != "standard":
            raise ValueError(
                f"save_bitnet: transformers' BitNet has SubLN before o_proj and down_proj only; this model "
                f"was converted with subln={conv['subln']!r}"
            )
        if any(n.endswith(("q_norm", "k_norm")) for n, _ in model.named_modules()):
            raise ValueError(f"save_bitnet: {mt} has q/k norms, which transformers' BitNet does not")
        head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
        if head_dim * src.num_attention_heads != src.hidden_size:
            raise ValueError(
                "save_bitnet: transformers' BitNet needs num_attention_heads * head_dim == hidden_size, got "
                f"{src.num_attention_heads} * {head_dim} != {src.hidden_size}"
            )
        if getattr(src, "sliding_window", None):
            warnings.warn(
                f"save_bitnet: transformers' BitNet has no sliding-window attention; the saved model attends "
                f"to all positions (same logits up to sequences of {src.sliding_window} tokens)",
                stacklevel=3,
            )
    if conv.get("lrc_rank") is not None or any(isinstance(m, BitLinearLRC) for _, m in bitlinear_modules(model)):
        raise ValueError("save_bitnet: transformers' BitNet has no low-rank correction (LRC)")
    if conv.get("qsparse") is not None:
        raise ValueError("save_bitnet: transformers' BitNet has no Q-Sparse activation sparsity")
    for _, m in bitlinear_modules(model):
        if m.out_features % VALUES_PER_BYTE and packed:
            raise ValueError(f"save_bitnet: packed layers need out_features % 4 == 0, got {m.out_features}")

    fields = {k: getattr(src, k) for k in _CONFIG_FIELDS if hasattr(src, k)}
    fields["attention_bias"] = _attention_bias(model)
    config = BitNetConfig(**fields)
    config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear" if packed else "autobitlinear",
        "quantization_mode": "offline" if packed else "online",
        "modules_to_not_convert": ["lm_head"],
        "use_rms_norm": False,
    }
    return config


def bitnet_blocker(model: nn.Module) -> str | None:
    """Why ``model`` has no transformers BitNet form (nor, so, a GGUF bitnet one): :func:`bitnet_config`'s
    refusal (LRC, Q-Sparse, SubLN elsewhere than before o_proj and down_proj, q/k norms), or None."""
    try:
        bitnet_config(model)
    except ValueError as e:
        return str(e).removeprefix("save_bitnet: ")
    return None


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attention_bias(model: nn.Module) -> bool:
    """Whether any attention projection has a bias (then transformers' BitNet gives all four one)."""
    projections = (m for n, m in model.named_modules() if n.endswith(_ATTENTION_PROJECTIONS))
    return any(getattr(m, "bias", None) is not None for m in projections)


def bitnet_state_dict(model: nn.Module, *, packed: bool = True) -> dict[str, Tensor]:
    """``model``'s weights under transformers BitNet names; see the module docstring for the layout."""
    layers = dict(bitlinear_modules(model))
    attention_bias = _attention_bias(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        owner, _, sub = module_name.rpartition(".")
        if module_name in layers:
            continue  # written below
        if sub == "subln" and owner in layers:
            for ours, theirs in _SUBLN_KEYS.items():
                if owner.endswith(ours):
                    out[owner[: -len(ours)] + theirs + "." + leaf] = value
                    break
            else:
                raise ValueError(f"save_bitnet: SubLN in {owner} has no place in transformers' BitNet")
            continue
        out[key] = value
    for name, layer in layers.items():
        codes, scale = layer.ternary_weight()
        if packed:
            out[f"{name}.weight"] = pack_hf_ternary(codes.cpu())
            out[f"{name}.weight_scale"] = (1.0 / scale.to(torch.float32)).reshape(1)
        else:
            out[f"{name}.weight"] = layer.weight.detach()
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach()
        elif attention_bias and name.endswith(_ATTENTION_PROJECTIONS):
            out[f"{name}.bias"] = torch.zeros(layer.out_features, dtype=torch.float32)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_bitnet(model: nn.Module, path: str | os.PathLike, *, packed: bool = True) -> Path:
    """Write ``model`` as a transformers `bitnet` checkpoint: ``config.json`` + ``model.safetensors``.

    Args:
        model: a model converted by :func:`wrinklefree.convert` (or loaded by :func:`load_bitnet`).
        path: the checkpoint directory (created; existing files are replaced, each atomically).
        packed: 2-bit packed weights (inference; the format of microsoft/bitnet-b1.58-2B-4T) or
            the latent full-precision weights (quantized online by transformers; trainable).
    Returns:
        the directory. ``AutoModelForCausalLM.from_pretrained(path)`` loads it (transformers needs
        the ``accelerate`` package for quantized checkpoints).
    """
    from safetensors.torch import save_file

    config = bitnet_config(model, packed=packed)
    tensors = bitnet_state_dict(model, packed=packed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write_text(path / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


# ---- import -------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> tuple[Any, dict[str, Tensor]]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_bitnet: {path} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_bitnet: {path} has no *.safetensors weights")
    config = AutoConfig.from_pretrained(path)
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return config, state


def load_bitnet(
    source: str | os.PathLike | dict[str, Tensor],
    config=None,
    *,
    schedule: QuantSchedule | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A transformers BitNetForCausalLM with our BitLinear layers, from a `bitnet` checkpoint.

    Args:
        source: a checkpoint directory (config.json + safetensors), or a state dict of
            BitNetForCausalLM (then ``config`` is required).
        config: a BitNetConfig (or its dict), for state-dict sources.
        schedule: the warm-up schedule for training; None: fully quantized.
        device: where the weights go.
    Returns:
        the model in eval mode. Packed projections become packed BitLinear layers (inference);
        latent ones become trainable BitLinear layers.
    """
    from transformers import BitNetConfig, BitNetForCausalLM

    if isinstance(source, dict):
        if config is None:
            raise ValueError("load_bitnet: a state-dict source needs config=")
        state = dict(source)
    else:
        config, state = _read_checkpoint(Path(source))
    if isinstance(config, dict):
        config = BitNetConfig(**config)
    if getattr(config, "model_type", None) != "bitnet":
        raise ValueError(
            f"load_bitnet: expected a bitnet config, got model_type={getattr(config, 'model_type', None)!r}"
        )
    config = BitNetConfig(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})

    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    convert(model, schedule=schedule)
    set_above: set[str] = set()  # keys of the packed layers, which are built from the state here
    lacking: list[str] = []  # biases of packed layers the checkpoint does not have
    for name, layer in list(bitlinear_modules(model)):
        w = state.get(f"{name}.weight")
        if w is None:
            raise KeyError(f"load_bitnet: missing weight {name}.weight")
        if w.dtype == torch.uint8:
            scale_key = f"{name}.weight_scale"
            if scale_key not in state:
                raise KeyError(f"load_bitnet: packed {name}.weight has no {scale_key}")
            codes = unpack_hf_ternary(state.pop(f"{name}.weight"), layer.out_features)
            if codes.shape[1] != layer.in_features:
                raise ValueError(
                    f"load_bitnet: {name}.weight has {codes.shape[1]} inputs, expected {layer.in_features}"
                )
            inv = state.pop(scale_key).to(torch.float32).reshape(())
            # the bias the config gives the layer (attention_bias); one it does not give stays in the
            # state, and is reported as unexpected below
            bias = state.pop(f"{name}.bias", None) if layer.bias is not None else None
            if layer.bias is not None and bias is None:
                lacking.append(f"{name}.bias")
            model.set_submodule(name, BitLinear.from_ternary(codes, 1.0 / inv, bias, schedule=schedule))
            set_above |= {f"{name}.packed", f"{name}.bias"}
    _materialize(model, device)
    _reset_non_persistent_buffers(model, config, device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = lacking + [
        k for k in missing if k not in set_above and not (config.tie_word_embeddings and k == "lm_head.weight")
    ]
    if missing or unexpected:
        raise ValueError(
            f"load_bitnet: checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _materialize(model: nn.Module, device) -> None:
    """Allocate (uninitialized) every tensor still on the meta device; real ones stay as they are."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)


def _reset_non_persistent_buffers(model: nn.Module, config, device) -> None:
    """Buffers not in the state dict (RoPE frequencies) were left empty by to_empty: rebuild them."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            with torch.device(device):
                model.set_submodule(name, type(module)(config))
