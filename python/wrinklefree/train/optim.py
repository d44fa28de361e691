"""Optimizers, learning-rate schedules and ZClip for the trainer (DESIGN.md section 5).

The trainer passes plain dicts (``OmegaConf.to_container`` of the Hydra config):

- :func:`build_optimizer` (``type``: ``adamw``, ``adamw8bit`` or ``muon``; see :mod:`.muon` for
  MuonClip and :func:`qk_clip`),
- :func:`build_lr_scheduler` (``type``: ``cosine``, ``linear``, ``wsd`` or ``constant``, all with a
  linear warm-up from 0),
- :class:`ZClip`, z-score gradient-norm clipping (Kumar et al., arXiv:2504.02507).

Unknown types or keys raise ValueError naming them, so a typo in a config fails at start-up.

Weight decay: every parameter with ``ndim >= 2`` decays (linear weights, embeddings and the output
head), every ``ndim < 2`` parameter (biases, norm gains, scalars) does not. Frozen parameters
(``requires_grad=False``) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from wrinklefree.train.muon import (
    LR_ADJUST_RULES,
    NS_DTYPES,
    MaxLogitTracker,
    MuonAdamW,
    find_attention_layers,
    newton_schulz,
    qk_clip,
)

__all__ = [
    "LRSchedule",
    "MaxLogitTracker",
    "MuonAdamW",
    "ZClip",
    "build_lr_scheduler",
    "build_optimizer",
    "find_attention_layers",
    "newton_schulz",
    "qk_clip",
    "split_params",
]

OPTIMIZER_TYPES = ("adamw", "adamw8bit", "muon")
# Muon-only keys are accepted (and ignored) for the AdamW types so one config block can switch type.
OPTIMIZER_KEYS = frozenset(
    {"type", "lr", "weight_decay", "betas", "eps", "fused"}
    | {"momentum", "nesterov", "ns_steps", "ns_dtype", "muon_lr", "muon_lr_adjust"}
)
SCHEDULE_TYPES = ("cosine", "linear", "wsd", "constant")
SCHEDULE_KEYS = frozenset({"type", "warmup_steps", "min_lr_ratio", "decay_fraction"})


def _check_keys(what: str, cfg: dict, allowed: frozenset, kind_key: str, kinds: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {sorted(allowed)}")
    if kind_key not in cfg:
        raise ValueError(f"{what} config needs '{kind_key}', one of {kinds}")
    if cfg[kind_key] not in kinds:
        raise ValueError(f"unknown {what} type {cfg[kind_key]!r}; expected one of {kinds}")


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of the input embedding, the output head and any other nn.Embedding weights."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


def split_params(model: nn.Module, muon: bool = False) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by optimizer group, as (name, parameter) lists.

    Returns ``{"muon": ..., "decay": ..., "no_decay": ...}``: with ``muon``, "muon" holds the 2-D hidden
    matrices (everything 2-D except embeddings and the output head, found with the HF
    ``get_input_embeddings``/``get_output_embeddings`` when the model has them); "decay" the other
    ``ndim >= 2`` parameters; "no_decay" those with ``ndim < 2``. Tied weights appear once.
    """
    excluded = _embedding_param_ids(model) if muon else set()
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            groups["no_decay"].append((name, p))
        elif muon and p.ndim == 2 and id(p) not in excluded:
            groups["muon"].append((name, p))
        else:
            groups["decay"].append((name, p))
    return groups


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg["type"]`` over ``model``'s trainable parameters.

    Keys: ``type`` ("adamw" | "adamw8bit" | "muon"), ``lr`` (required), ``weight_decay`` (0.1),
    ``betas`` ([0.9, 0.95]), ``eps`` (1e-8), ``fused`` (AdamW only; None: fused when every parameter is
    on CUDA, else torch's default foreach/for-loop). Muon only: ``momentum`` (0.95), ``nesterov``
    (True), ``ns_steps`` (5), ``ns_dtype`` ("bfloat16"), ``muon_lr_adjust`` ("match_rms_adamw":
    Muon updates scaled by 0.2 sqrt(max(rows, cols)) so that ``lr`` and ``weight_decay`` serve both
    kinds of groups; or "original": sqrt(max(1, rows/cols)); or "none"), ``muon_lr`` (defaults to ``lr``).

    - adamw: ``torch.optim.AdamW``, groups "decay" and "no_decay" (see :func:`split_params`).
    - adamw8bit: ``bitsandbytes.optim.AdamW8bit`` on the same groups (block-wise 8-bit moments for tensors of
      4096 values and more); needs bitsandbytes, on CUDA, or on CPU from bitsandbytes 0.50 (its CPU backend).
    - muon: one :class:`MuonAdamW`: Muon on the hidden matrices, AdamW on the rest.
    """
    _check_keys("optimizer", cfg, OPTIMIZER_KEYS, "type", OPTIMIZER_TYPES)
    if "lr" not in cfg:
        raise ValueError("optimizer config needs 'lr'")
    kind = cfg["type"]
    lr = float(cfg["lr"])
    weight_decay = float(cfg.get("weight_decay", 0.1))
    betas = tuple(float(b) for b in cfg.get("betas", (0.9, 0.95)))
    if len(betas) != 2:
        raise ValueError(f"optimizer 'betas' needs two values, got {cfg['betas']}")
    eps = float(cfg.get("eps", 1e-8))

    split = split_params(model, muon=kind == "muon")
    params = [p for group in split.values() for _, p in group]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")

    def group(key: str, **options) -> list[dict]:
        return [dict(params=[p for _, p in split[key]], **options)] if split[key] else []

    adamw_groups = group("decay", weight_decay=weight_decay) + group("no_decay", weight_decay=0.0)

    if kind == "adamw":
        fused = cfg.get("fused")
        if fused is None:
            fused = all(p.device.type == "cuda" and p.is_floating_point() for p in params)
        return torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=bool(fused) or None)

    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise ImportError(
                "optimizer type 'adamw8bit' needs bitsandbytes (`pip install bitsandbytes`); use type 'adamw' "
                "without it"
            ) from err
        from packaging.version import Version  # a dependency of bitsandbytes

        devices = {p.device.type for p in params}
        if not devices <= {"cuda", "cpu"}:
            raise ValueError(f"optimizer type 'adamw8bit' runs on CUDA or CPU, not {sorted(devices - {'cuda', 'cpu'})}")
        if "cpu" in devices and Version(bitsandbytes.__version__) < Version("0.50"):
            raise ValueError(
                f"optimizer type 'adamw8bit' on CPU needs bitsandbytes >= 0.50 (its CPU backend), found "
                f"{bitsandbytes.__version__}; upgrade it or use type 'adamw'"
            )
        return bitsandbytes.optim.AdamW8bit(adamw_groups, lr=lr, betas=betas, eps=eps)

    lr_adjust = cfg.get("muon_lr_adjust", "match_rms_adamw")
    if lr_adjust not in LR_ADJUST_RULES:
        raise ValueError(f"unknown muon_lr_adjust {lr_adjust!r}; expected one of {LR_ADJUST_RULES}")
    ns_dtype = cfg.get("ns_dtype", "bfloat16")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"unknown ns_dtype {ns_dtype!r}; expected one of {tuple(NS_DTYPES)}")
    muon_groups = group("muon", use_muon=True, weight_decay=weight_decay, lr=float(cfg.get("muon_lr", lr)))
    return MuonAdamW(
        muon_groups + adamw_groups,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        momentum=float(cfg.get("momentum", 0.95)),
        nesterov=bool(cfg.get("nesterov", True)),
        ns_steps=int(cfg.get("ns_steps", 5)),
        ns_dtype=ns_dtype,
        lr_adjust=lr_adjust,
    )


class LRSchedule:
    """Learning-rate multiplier of step ``t`` (the callable behind :func:`build_lr_scheduler`).

    Warm-up: ``t / warmup_steps`` for ``t < warmup_steps`` (0 at step 0). Then, with
    ``p = (t - warmup) / (max_steps - warmup)`` clamped to [0, 1] and ``r = min_lr_ratio``:
    cosine ``r + (1 - r) (1 + cos(pi p)) / 2``; linear ``r + (1 - r)(1 - p)``; constant ``1``;
    wsd ``1`` until ``decay_start = max_steps - round(decay_fraction * max_steps)`` (at least the end of
    warm-up), then linear from 1 to ``r`` at ``max_steps``. Past ``max_steps`` the end value holds.
    """

    def __init__(
        self, kind: str, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, decay_fraction: float = 0.2
    ) -> None:
        if kind not in SCHEDULE_TYPES:
            raise ValueError(f"unknown lr schedule type {kind!r}; expected one of {SCHEDULE_TYPES}")
        if max_steps < 1 or warmup_steps < 0:
            raise ValueError(f"lr schedule needs max_steps >= 1 and warmup_steps >= 0, got {max_steps}, {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0 or not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"min_lr_ratio and decay_fraction must be in [0, 1], got {min_lr_ratio}, {decay_fraction}")
        self.kind = kind
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_fraction = float(decay_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        r = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_steps = round(self.decay_fraction * self.max_steps)
            decay_start = max(self.max_steps - decay_steps, self.warmup_steps)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, self.max_steps - decay_start))
            return 1.0 - (1.0 - r) * progress
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.kind == "cosine":
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return r + (1.0 - r) * (1.0 - progress)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, max_steps: int) -> LambdaLR:
    """A LambdaLR scaling every group's lr by :class:`LRSchedule` (call ``scheduler.step()`` per optimizer step).

    Keys: ``type`` ("cosine" | "linear" | "wsd" | "constant"), ``warmup_steps`` (0), ``min_lr_ratio``
    (0.0), ``decay_fraction`` (0.2; wsd only: the share of ``max_steps`` spent in the final decay).
    ``state_dict()`` holds the step (``last_epoch``) and the base lrs, not the schedule's shape: that
    comes from ``cfg`` and ``max_steps`` when the scheduler is built, so a resumed run may change them.
    """
    _check_keys("lr schedule", cfg, SCHEDULE_KEYS, "type", SCHEDULE_TYPES)
    schedule = LRSchedule(
        cfg["type"],
        max_steps,
        warmup_steps=int(cfg.get("warmup_steps", 0)),
        min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)),
        decay_fraction=float(cfg.get("decay_fraction", 0.2)),
    )

    # A plain function, not the LRSchedule object: LambdaLR checkpoints an object's __dict__ and would
    # restore the old shape over the config's on resume.
    def multiplier(step: int) -> float:
        return schedule(step)

    return LambdaLR(optimizer, multiplier)


class ZClip:
    """Z-score gradient-norm clipping with EMA statistics (ZClip, arXiv:2504.02507; DESIGN.md section 5).

    Each :meth:`step` (after ``backward``, before ``optimizer.step``) computes the total L2 gradient norm
    ``g`` (``torch.nn.utils.get_total_norm``; DTensor grads under FSDP2 are reduced to the global norm).

    - Warm-up (the first ``warmup_steps`` calls): ``g`` is only recorded; nothing is clipped unless
      ``max_grad_norm`` is given, in which case plain norm clipping at ``max_grad_norm`` applies. At the
      end, ``mu`` and ``var`` are the mean and (population) variance of the recorded norms.
    - After: ``z = (g - mu) / (sigma + eps)``. On a spike (``z > z_thresh``) the gradients are scaled so
      their norm becomes ``mu + z_thresh**2 * sigma / z`` (the reciprocal rule: the bigger the spike, the
      harder the clip). ``max_grad_norm``, when given, also caps the norm. The statistics then take the
      (adaptively clipped) norm ``x``: ``mu <- a mu + (1 - a) x``; ``var <- a var + (1 - a)(x - mu)^2``.

    Everything stays on the gradients' device (no host synchronization); the statistics are 0-d
    float32 tensors.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        eps: float = 1e-6,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
    ) -> None:
        if not 0.0 < alpha < 1.0 or z_thresh <= 0 or warmup_steps < 1:
            raise ValueError(f"bad ZClip settings: alpha={alpha}, z_thresh={z_thresh}, warmup_steps={warmup_steps}")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.foreach = foreach
        self.num_steps = 0
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._warmup_norms: list[Tensor] = []
        self.last_clipped_norm: Tensor | None = None  # the norm after this step's clipping, for logging

    @staticmethod
    def _params(model_or_params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
        if isinstance(model_or_params, nn.Module):
            return list(model_or_params.parameters())
        if isinstance(model_or_params, Tensor):
            return [model_or_params]
        return list(model_or_params)

    @torch.no_grad()
    def step(self, model_or_params: nn.Module | Iterable[Tensor]) -> Tensor:
        """Clip in place if needed and update the statistics.

        Returns:
            The total gradient norm before clipping: a 0-d float32 tensor on the gradients' device.
        """
        params = [p for p in self._params(model_or_params) if p.grad is not None]
        if not params:
            return torch.zeros(())
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=self.foreach)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        total = total.float()

        if self.num_steps < self.warmup_steps:
            self._warmup_norms.append(total.detach().clone())
            target = total
            if self.max_grad_norm is not None:
                target = torch.clamp(total, max=self.max_grad_norm)
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, total, foreach=self.foreach)
            self.num_steps += 1
            if self.num_steps == self.warmup_steps:
                norms = torch.stack(self._warmup_norms)
                self.mean = norms.mean()
                self.var = norms.var(unbiased=False)
                self._warmup_norms = []
            self.last_clipped_norm = target
            return total

        mean, var = self.mean.to(total), self.var.to(total)
        sigma = var.sqrt()
        z = (total - mean) / (sigma + self.eps)
        adaptive = torch.where(z > self.z_thresh, mean + self.z_thresh**2 * sigma / z, total)
        target = adaptive if self.max_grad_norm is None else torch.clamp(adaptive, max=self.max_grad_norm)
        # Scale by target / total only when it shrinks; the formula's target is < total for every spike.
        coef = torch.where(target < total, target / total.clamp_min(1e-12), torch.ones_like(total))
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, device_grads in by_device.items():
            torch._foreach_mul_(device_grads, coef.to(device))
        self.mean = self.alpha * mean + (1 - self.alpha) * adaptive
        self.var = self.alpha * var + (1 - self.alpha) * (adaptive - self.mean) ** 2
        self.num_steps += 1
        self.last_clipped_norm = torch.minimum(target, total)
        return total

    def state_dict(self) -> dict:
        """Settings and statistics (tensors on CPU)."""
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "eps": self.eps,
            "max_grad_norm": self.max_grad_norm,
            "num_steps": self.num_steps,
            "mean": None if self.mean is None else self.mean.detach().cpu(),
            "var": None if self.var is None else self.var.detach().cpu(),
            "warmup_norms": torch.stack(self._warmup_norms).cpu() if self._warmup_norms else torch.zeros(0),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("alpha", "z_thresh", "warmup_steps", "eps", "max_grad_norm", "num_steps"):
            setattr(self, key, state[key])
        self.mean = None if state["mean"] is None else torch.as_tensor(state["mean"], dtype=torch.float32)
        self.var = None if state["var"] is None else torch.as_tensor(state["var"], dtype=torch.float32)
        self._warmup_norms = list(torch.as_tensor(state["warmup_norms"], dtype=torch.float32).unbind())
