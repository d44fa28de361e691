"""The quantization warm-up schedule: one object per model, shared by all its BitLinear layers.

``x' = x + lam * (q(x) - x)`` for weights and activations (DESIGN.md section 2), with ``lam``
going from 0 to 1 over ``warmup_steps``. The value lives in a 0-dim tensor that is updated in
place, so a compiled model reads the new value every step without recompiling. The trainer
calls :meth:`QuantSchedule.step` once per optimizer step and saves :meth:`state_dict` with its
checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULE_KINDS = ("linear", "sigmoid", "exponential", "constant")


class QuantSchedule:
    """Warm-up factor ``lam(step)`` in [0, 1].

    Kinds (``t = step / warmup_steps``, and ``lam = 1`` once ``step >= warmup_steps``):
        linear:      ``lam = t`` (the default, ``min(step / 1000, 1)`` with the default length);
        sigmoid:     ``lam = sigmoid(sharpness * (t - 0.5))``, rescaled to 0 at t = 0 and 1 at t = 1;
        exponential: ``lam = (exp(sharpness * t) - 1) / (exp(sharpness) - 1)``;
        constant:    ``lam = value`` always (``warmup_steps`` unused).

    Args:
        warmup_steps: steps until full quantization (>= 0; 0 means quantized from the start).
        kind: one of :data:`SCHEDULE_KINDS`.
        sharpness: steepness of the sigmoid and exponential kinds (> 0).
        value: the constant kind's factor.
    """

    def __init__(
        self, warmup_steps: int = 1000, kind: str = "linear", *, sharpness: float = 10.0, value: float = 1.0
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"QuantSchedule: kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"QuantSchedule: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not sharpness > 0:
            raise ValueError(f"QuantSchedule: sharpness must be > 0, got {sharpness!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"QuantSchedule: value must be in [0, 1], got {value!r}")
        self.warmup_steps = warmup_steps
        self.kind = kind
        self.sharpness = float(sharpness)
        self.value = float(value)
        self.current_step = 0
        self.lam = torch.zeros((), dtype=torch.float32)
        # the step as a tensor too, for what a compiled model derives from it (Q-Sparse's warm-up):
        # read from a tensor, a new value needs no recompile
        self.step_tensor = torch.zeros((), dtype=torch.float64)
        self._update()

    def lam_at(self, step: int) -> float:
        """The factor at ``step`` (pure: does not move the schedule)."""
        if self.kind == "constant":
            return self.value
        if step >= self.warmup_steps:
            return 1.0
        t = max(step, 0) / self.warmup_steps
        if self.kind == "linear":
            return t
        k = self.sharpness
        if self.kind == "sigmoid":
            lo, hi = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
            return (1 / (1 + math.exp(-k * (t - 0.5))) - lo) / (hi - lo)
        return math.expm1(k * t) / math.expm1(k)

    def _update(self) -> None:
        value = self.lam_at(self.current_step)
        self.lam.fill_(value)
        self.step_tensor.fill_(self.current_step)
        # Known on the host, so a layer can pick the fully quantized kernels without reading lam
        # back from a device; torch.compile guards on it and recompiles once when it turns True.
        self.full = value >= 1.0

    def step(self) -> float:
        """Advance one step; returns the new factor."""
        self.current_step += 1
        self._update()
        return float(self.lam)

    def set_step(self, step: int) -> None:
        self.current_step = int(step)
        self._update()

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "sharpness": self.sharpness,
            "value": self.value,
            "step": self.current_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"warmup_steps", "kind", "sharpness", "value", "step"}
        if unknown:
            raise ValueError(f"QuantSchedule.load_state_dict: unknown keys {sorted(unknown)}")
        restored = QuantSchedule(
            state.get("warmup_steps", self.warmup_steps),
            state.get("kind", self.kind),
            sharpness=state.get("sharpness", self.sharpness),
            value=state.get("value", self.value),
        )
        self.warmup_steps, self.kind = restored.warmup_steps, restored.kind
        self.sharpness, self.value = restored.sharpness, restored.value
        self.set_step(state.get("step", 0))

    def __repr__(self) -> str:
        return (
            f"QuantSchedule(kind={self.kind!r}, warmup_steps={self.warmup_steps}, step={self.current_step}, "
            f"lam={float(self.lam):.4g})"
        )
