"""ObjectiveManager: the weighted sum of the objectives, with weights that change by phase."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn


class ObjectiveManager(nn.Module):
    """``loss = sum_i w_i(step) * L_i(model, batch)``, skipping objectives whose weight is 0.

    Args:
        objectives: name -> objective module, called as ``objective(model, batch) -> 0-dim loss``.
        weights: name -> the weight used when no curriculum phase applies.
        curriculum: phases ``[{"until": f, "weights": {name: w}}, ...]`` in increasing ``until``,
            a fraction of ``max_steps`` (phase i covers steps below ``until * max_steps``);
            names a phase leaves out keep their base weight. Steps past the last phase use it.
        max_steps: the run's length, for the fractions.
    """

    def __init__(
        self,
        objectives: Mapping[str, nn.Module],
        weights: Mapping[str, float],
        curriculum: Sequence[Mapping] = (),
        max_steps: int = 1,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(objectives)
        if unknown:
            raise ValueError(f"ObjectiveManager: weights for unknown objectives {sorted(unknown)}")
        self.objectives = nn.ModuleDict(objectives)
        self.base_weights = {name: float(weights.get(name, 0.0)) for name in objectives}
        self.max_steps = max(1, int(max_steps))
        self.phases = []
        last = 0.0
        for i, phase in enumerate(curriculum):
            extra = set(phase) - {"until", "weights"}
            if extra:
                raise ValueError(f"ObjectiveManager: curriculum[{i}] has unknown keys {sorted(extra)}")
            until = float(phase["until"])
            if not last < until <= 1.0:
                raise ValueError(f"ObjectiveManager: curriculum[{i}].until must be in ({last}, 1], got {until}")
            bad = set(phase.get("weights", {})) - set(objectives)
            if bad:
                raise ValueError(f"ObjectiveManager: curriculum[{i}] weights unknown objectives {sorted(bad)}")
            self.phases.append((until, {**self.base_weights, **{k: float(v) for k, v in phase["weights"].items()}}))
            last = until

    def weights_at(self, step: int) -> dict[str, float]:
        for until, weights in self.phases:
            if step < until * self.max_steps:
                return weights
        return self.phases[-1][1] if self.phases else self.base_weights

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, {name: its unweighted loss, detached})`` for the objectives in use at ``step``."""
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, w in self.weights_at(step).items():
            if w == 0.0:
                continue
            loss = self.objectives[name](model, batch)
            parts[name] = loss.detach()
            total = w * loss if total is None else total + w * loss
        if total is None:
            raise ValueError(f"ObjectiveManager: every objective has weight 0 at step {step}")
        return total, parts
