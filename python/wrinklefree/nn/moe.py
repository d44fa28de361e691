"""Mixture of experts for BitNet models: routers, ternary experts, the MoE FFN, and the "fake MoE"
built from a dense model (DESIGN.md section 1, nn/).

    TopKRouter        full-precision gate, softmax, top-k, Switch-Transformer load-balancing loss
    IdentityRouter    no parameters: every token to experts 0..k-1 with weight 1/k
    BitNetExpertFFN   a Llama-style gated FFN on BitLinear (``down(act(gate(x)) * up(x))``)
    BitNetMoEFFN      routes each token to k experts and sums their outputs, weighted

:func:`create_fake_moe_from_dense` replaces every FFN of a Hugging Face causal LM by an MoE whose
experts are all copies of that FFN; with router weights that sum to 1 the model computes what
the dense one did, so training can start from the dense model and let the experts diverge.
:func:`verify_moe_matches_dense` checks that.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from wrinklefree.nn.bitlinear import BitLinear, bitlinear_modules
from wrinklefree.nn.schedule import QuantSchedule

EXPERT_ACTIVATIONS = ("silu", "relu2")
ROUTER_KINDS = ("topk", "identity")
_MLP_ATTRS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _check_int(owner: str, name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value}")
    return value


def _check_tokens(owner: str, x: Tensor, hidden_size: int | None = None) -> None:
    if x.dim() != 2 or (hidden_size is not None and x.shape[1] != hidden_size):
        want = f"[T, {hidden_size}]" if hidden_size is not None else "[T, H]"
        raise ValueError(f"{owner}: x must be {want}, got shape {tuple(x.shape)}")


# ---- routers ----------------------------------------------------------------------------------


class TopKRouter(nn.Module):
    """Softmax top-k router with a full-precision gate.

    ``probs = softmax(x W_g^T)`` in float32 over the experts; each token goes to its ``top_k``
    most probable experts with those probabilities as weights (renormalized to sum 1 when
    ``normalize``). The gate stays a plain nn.Linear: routing decisions are too sensitive to
    quantize, and BitNet keeps small full-precision parts (like the output head) unquantized.
    :func:`wrinklefree.convert` leaves the gate an nn.Linear.

    Args:
        hidden_size: H, the token size.
        num_experts: E.
        top_k: experts per token, in [1, E].
        normalize: renormalize the k weights of a token to sum 1.
        device, dtype: of ``gate.weight`` [E, H].

    Forward: ``x`` [T, H] -> ``(weights [T, k] in x's dtype, indices [T, k] int64, aux_loss)``, with
    ``aux_loss`` a 0-dim float32 tensor, the Switch-Transformer load-balancing loss
    ``E * sum_e f_e * P_e``: ``f_e`` the fraction of the ``T * k`` assignments given to expert e
    (a count, no gradient), ``P_e`` the mean router probability of e (differentiable). It is 1
    for a perfectly balanced router and grows to E when one expert takes everything.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        _check_int("TopKRouter", "hidden_size", hidden_size, 1)
        _check_int("TopKRouter", "num_experts", num_experts, 1)
        _check_int("TopKRouter", "top_k", top_k, 1, num_experts)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = bool(normalize)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_tokens(type(self).__name__, x, self.hidden_size)
        logits = self.gate(x.to(self.gate.weight.dtype))
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        top, indices = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        aux = self.load_balancing_loss(probs, indices)
        return top.to(x.dtype), indices, aux

    def load_balancing_loss(self, probs: Tensor, indices: Tensor) -> Tensor:
        """``E * sum_e f_e * P_e`` from ``probs`` [T, E] float32 and ``indices`` [T, k]; 0-dim float32."""
        if probs.shape[0] == 0:  # no tokens: nothing to balance (and the means would be NaN)
            return probs.sum()
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        f = counts.to(torch.float32) / indices.numel()
        return self.num_experts * (f * probs.mean(dim=0)).sum()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize={self.normalize}"
        )


class IdentityRouter(nn.Module):
    """A router without parameters: every token goes to experts ``0 .. top_k - 1``, each with
    weight ``1 / top_k``; the aux loss is 0. Useful to check an MoE against its dense origin and
    as a fixed baseline.

    Args:
        num_experts: E (the experts past ``top_k`` get no tokens).
        top_k: experts per token, in [1, E].

    Forward: as :class:`TopKRouter`: ``x`` [T, H] -> ``(weights [T, k] in x's dtype,
    indices [T, k] int64, aux_loss 0-dim float32 zero)``.
    """

    def __init__(self, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        _check_int("IdentityRouter", "num_experts", num_experts, 1)
        _check_int("IdentityRouter", "top_k", top_k, 1, num_experts)
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_tokens(type(self).__name__, x)
        t = x.shape[0]
        weights = torch.full((t, self.top_k), 1.0 / self.top_k, dtype=x.dtype, device=x.device)
        indices = torch.arange(self.top_k, device=x.device).repeat(t, 1)
        return weights, indices, torch.zeros((), dtype=torch.float32, device=x.device)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


# ---- experts ----------------------------------------------------------------------------------


def _activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(
                f"BitNetExpertFFN: activation must be one of {EXPERT_ACTIVATIONS} or a callable, got {activation!r}"
            )
        # transformers' modules, so that an expert matches a converted model's FFN exactly
        from transformers.activations import ACT2FN

        return ACT2FN[activation]
    if not callable(activation):
        raise ValueError(
            f"BitNetExpertFFN: activation must be one of {EXPERT_ACTIVATIONS} or a callable, got {activation!r}"
        )
    return activation


def _copy_sharing_schedules(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose BitLinear and Q-Sparse layers still read the same
    :class:`QuantSchedule` objects: the schedule is the trainer's global warm-up state, and a
    private copy would never advance."""
    memo = {id(s): s for s in _schedules(module)}
    return copy.deepcopy(module, memo)


def _schedules(model: nn.Module) -> list[QuantSchedule]:
    found = []
    for _, m in bitlinear_modules(model):
        found.append(m.schedule)
        if m.qsparse is not None:
            found.append(m.qsparse.schedule)
    return [s for s in found if s is not None]


class BitNetExpertFFN(nn.Module):
    """One expert: a gated FFN on ternary layers, ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Args:
        hidden_size: H, input and output size.
        intermediate_size: I, the inner size.
        activation: "silu", "relu2" (``relu(x)^2``, BitNet's) or a callable (an nn.Module is
            registered as a submodule).
        subln: put a SubLN before ``down_proj`` (BitNet's FFN sub-norm).
        subln_eps: its epsilon.
        bias: biases on the three projections.
        schedule: the quantization warm-up schedule the projections read; None: fully quantized.
        device, dtype: of the parameters.

    ``gate_proj`` and ``up_proj`` are BitLinear H -> I, ``down_proj`` BitLinear I -> H.
    Input [..., H] float; output [..., H] in the input's dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Callable[[Tensor], Tensor] = "silu",
        subln: bool = True,
        subln_eps: float = 1e-5,
        bias: bool = False,
        schedule: QuantSchedule | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_int("BitNetExpertFFN", "hidden_size", hidden_size, 1)
        _check_int("BitNetExpertFFN", "intermediate_size", intermediate_size, 1)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = _activation(activation)
        kw = {"bias": bias, "device": device, "dtype": dtype, "schedule": schedule}
        self.gate_proj = BitLinear(hidden_size, intermediate_size, **kw)
        self.up_proj = BitLinear(hidden_size, intermediate_size, **kw)
        self.down_proj = BitLinear(intermediate_size, hidden_size, subln=subln, subln_eps=subln_eps, **kw)

    @classmethod
    def from_dense(cls, mlp: nn.Module) -> BitNetExpertFFN:
        """An expert computing exactly what ``mlp`` computes, from deep copies of its parts.

        ``mlp`` is a Llama-style FFN (``gate_proj``, ``up_proj``, ``down_proj``: nn.Linear or
        BitLinear; ``act_fn``), e.g. one of a model converted by :func:`wrinklefree.convert`.
        Each projection keeps its type and settings (SubLN, Q-Sparse, LRC, packing); the copies
        own their weights but share the original's :class:`QuantSchedule`.
        """
        missing = [a for a in _MLP_ATTRS if not hasattr(mlp, a)]
        if missing:
            raise ValueError(f"BitNetExpertFFN.from_dense: mlp has no {', '.join(missing)} ({type(mlp).__name__})")
        for name in _MLP_ATTRS[:3]:
            proj = getattr(mlp, name)
            if not isinstance(proj, nn.Linear):
                raise ValueError(
                    f"BitNetExpertFFN.from_dense: mlp.{name} must be an nn.Linear or BitLinear, "
                    f"got {type(proj).__name__}"
                )
        expert = cls.__new__(cls)  # skip __init__: it would build (and randomly fill) layers we replace
        nn.Module.__init__(expert)
        expert.hidden_size = mlp.gate_proj.in_features
        expert.intermediate_size = mlp.gate_proj.out_features
        # one deep copy of the four parts together keeps any sharing between them
        parts = nn.ModuleDict({a: m for a in _MLP_ATTRS if isinstance(m := getattr(mlp, a), nn.Module)})
        parts = _copy_sharing_schedules(parts)
        expert.act_fn = parts["act_fn"] if "act_fn" in parts else mlp.act_fn
        expert.gate_proj, expert.up_proj, expert.down_proj = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
        expert.training = mlp.training  # the copied parts keep their own modes
        return expert

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


# ---- the MoE FFN ------------------------------------------------------------------------------


class BitNetMoEFFN(nn.Module):
    """``y_t = sum_j w_tj * expert_{i_tj}(x_t)`` over the ``k`` experts the router picks per token.

    Args:
        router: a :class:`TopKRouter`, :class:`IdentityRouter` or any module with
            ``num_experts`` and the same forward contract.
        experts: the ``num_experts`` expert modules, each mapping [N, H] -> [N, H].

    Forward: ``x`` [..., H] float (e.g. [B, S, H] from a Hugging Face decoder layer) -> the same
    shape and dtype. Each expert runs once, on just its tokens (gathered with ``index_select``,
    scattered back with ``index_add_``); an expert given no tokens is not called, so its
    parameters get no gradient that step (DDP needs ``find_unused_parameters``; under FSDP2 shard
    the MoE FFN as one unit, not expert by expert). After each forward ``self.aux_loss`` holds the
    router's load-balancing loss (0-dim float32 tensor, in the autograd graph) for the trainer to
    add to its objective; None before the first forward.
    """

    def __init__(self, router: nn.Module, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if not isinstance(router, nn.Module):
            raise ValueError(f"BitNetMoEFFN: router must be an nn.Module, got {type(router).__name__}")
        experts = list(experts)
        if not experts or not all(isinstance(e, nn.Module) for e in experts):
            raise ValueError("BitNetMoEFFN: experts must be a non-empty list of nn.Module")
        n = getattr(router, "num_experts", len(experts))
        if n != len(experts):
            raise ValueError(f"BitNetMoEFFN: router.num_experts is {n} but {len(experts)} experts were given")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.aux_loss: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: the last aux_loss is in an autograd graph, which neither can copy
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, indices, self.aux_loss = self.router(h)
        k = indices.shape[-1]
        flat = indices.reshape(-1)
        # one sort by expert and one host sync for all experts, instead of a mask and a sync each
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        if len(counts) != self.num_experts:
            raise ValueError(f"BitNetMoEFFN: the router chose expert {len(counts) - 1} of {self.num_experts}")
        tokens = order // k
        slot_weights = weights.reshape(-1).index_select(0, order)
        out = torch.zeros_like(h)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n == 0:  # BitLinear rejects empty inputs, and there is nothing to add
                continue
            idx = tokens[start : start + n]
            y = expert(h.index_select(0, idx))
            out.index_add_(0, idx, (y * slot_weights[start : start + n, None]).to(out.dtype))
            start += n
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


# ---- dense -> MoE -----------------------------------------------------------------------------


def _dense_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost Llama-style FFNs of ``model`` (modules with gate/up/down_proj and act_fn)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in _MLP_ATTRS) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return found


def create_fake_moe_from_dense(model: nn.Module, num_experts: int, top_k: int, router: str = "topk") -> nn.Module:
    """A copy of ``model`` in which every FFN is a :class:`BitNetMoEFFN` of ``num_experts`` copies
    of that FFN (sparse upcycling).

    Args:
        model: a Hugging Face causal LM (e.g. ``LlamaForCausalLM``), dense or converted by
            :func:`wrinklefree.convert`; left unchanged.
        num_experts: experts per layer (>= 1).
        top_k: experts per token, in [1, num_experts].
        router: "topk" (a :class:`TopKRouter` with a freshly initialized gate and normalized
            weights) or "identity" (an :class:`IdentityRouter`).
    Returns:
        the new model. Since its experts are identical and each token's weights sum to 1, it
        computes what ``model`` computes up to float rounding (exactly with the identity router
        and ``top_k`` 1 or 2). Its BitLinear layers share ``model``'s QuantSchedule
        objects. ``config.wrinklefree_moe`` records the settings.
    """
    _check_int("create_fake_moe_from_dense", "num_experts", num_experts, 1)
    _check_int("create_fake_moe_from_dense", "top_k", top_k, 1, num_experts)
    if router not in ROUTER_KINDS:
        raise ValueError(f"create_fake_moe_from_dense: router must be one of {ROUTER_KINDS}, got {router!r}")
    if any(isinstance(m, BitNetMoEFFN) for m in model.modules()):
        raise ValueError("create_fake_moe_from_dense: the model already holds BitNetMoEFFN layers")
    if not _dense_mlps(model):
        raise ValueError(
            "create_fake_moe_from_dense: found no FFN to replace (a module with gate_proj, up_proj, down_proj "
            f"and act_fn) in {type(model).__name__}"
        )

    model = _copy_sharing_schedules(model)
    for name, mlp in _dense_mlps(model):
        if router == "topk":
            device, dtype = _device_dtype(mlp)
            r = TopKRouter(mlp.gate_proj.in_features, num_experts, top_k, normalize=True, device=device, dtype=dtype)
        else:
            r = IdentityRouter(num_experts, top_k)
        experts = [BitNetExpertFFN.from_dense(mlp) for _ in range(num_experts)]
        moe = BitNetMoEFFN(r, experts)
        moe.router.train(mlp.training)
        moe.training = mlp.training
        model.set_submodule(name, moe)

    config = getattr(model, "config", None)
    if config is not None:
        config.wrinklefree_moe = {"num_experts": num_experts, "top_k": top_k, "router": router}
    return model


def _device_dtype(mlp: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float dtype a new gate for ``mlp`` goes (a packed BitLinear holds uint8 bytes)."""
    tensors = [*mlp.parameters(), *mlp.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return device, floats[0].dtype if floats else torch.float32


def _logits(output) -> Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@torch.no_grad()
def verify_moe_matches_dense(
    dense: nn.Module, moe: nn.Module, input_ids: Tensor, atol: float = 1e-5
) -> tuple[bool, float]:
    """Run ``dense`` and ``moe`` on ``input_ids`` (int64 [B, S]) in eval mode without gradients and
    compare their logits (``.logits`` of the output when it has one).

    Returns:
        ``(matches, max_error)``: the largest absolute logit difference (a float; inf when the
        shapes differ, NaN when either model gives NaN) and whether it is ``<= atol``.
    The models' train/eval modes are restored afterwards.
    """
    if not atol >= 0:
        raise ValueError(f"verify_moe_matches_dense: atol must be >= 0, got {atol!r}")
    modes = [(m, m.training) for model in (dense, moe) for m in model.modules()]
    try:
        dense.eval()
        moe.eval()
        a = _logits(dense(input_ids))
        b = _logits(moe(input_ids))
    finally:
        for m, training in modes:
            m.training = training
    if a.shape != b.shape:
        return False, float("inf")
    err = (a.to(torch.float32) - b.to(torch.float32)).abs().max().item() if a.numel() else 0.0
    return bool(err <= atol), float(err)


__all__ = [
    "EXPERT_ACTIVATIONS",
    "ROUTER_KINDS",
    "BitNetExpertFFN",
    "BitNetMoEFFN",
    "IdentityRouter",
    "TopKRouter",
    "create_fake_moe_from_dense",
    "verify_moe_matches_dense",
]
