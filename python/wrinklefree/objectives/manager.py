"""ObjectiveManager: the weighted sum of the objectives, with weights that change by phase."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn


def _loss_names(key: str, module: nn.Module) -> Sequence[str]:
    """The losses an objective module gives: its ``losses``, or the one named by its key."""
    return getattr(module, "losses", (key,))


class ObjectiveManager(nn.Module):
    """``loss = sum_i w_i(step) * L_i(model, batch)``, skipping losses whose weight is 0.

    An objective module gives one loss, named by its key, called as ``objective(model, batch) -> 0-dim
    loss``; or several from one shared computation (e.g. CE and distillation from one forward pass): it
    then has a ``losses`` attribute naming them and is called once per step as
    ``objective(model, batch, active) -> {name: loss}`` with the names whose weight is not 0.

    Args:
        objectives: key -> objective module.
        weights: loss name -> the weight used when no curriculum phase applies.
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
        self.objectives = nn.ModuleDict(objectives)
        self.owner: dict[str, str] = {}  # loss name -> key of the objective that computes it
        for key, module in objectives.items():
            for name in _loss_names(key, module):
                if name in self.owner:
                    raise ValueError(f"ObjectiveManager: the loss {name!r} is given by two objectives")
                self.owner[name] = key
        unknown = set(weights) - set(self.owner)
        if unknown:
            raise ValueError(f"ObjectiveManager: weights for unknown objectives {sorted(unknown)}")
        self.base_weights = {name: float(weights.get(name, 0.0)) for name in self.owner}
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
            bad = set(phase.get("weights", {})) - set(self.owner)
            if bad:
                raise ValueError(f"ObjectiveManager: curriculum[{i}] weights unknown objectives {sorted(bad)}")
            self.phases.append((until, {**self.base_weights, **{k: float(v) for k, v in phase["weights"].items()}}))
            last = until

    def weights_at(self, step: int) -> dict[str, float]:
        for until, weights in self.phases:
            if step < until * self.max_steps:
                return weights
        return self.phases[-1][1] if self.phases else self.base_weights

    def losses(self, model: nn.Module, batch: dict[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        """The unweighted losses ``names``, each objective module called once."""
        out: dict[str, Tensor] = {}
        for key, module in self.objectives.items():
            active = [name for name in _loss_names(key, module) if name in names]
            if not active:
                continue
            if hasattr(module, "losses"):
                out.update(module(model, batch, active))
            else:
                out[key] = module(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, {name: its unweighted loss, detached})`` for the objectives in use at ``step``."""
        weights = {name: w for name, w in self.weights_at(step).items() if w != 0.0}
        if not weights:
            raise ValueError(f"ObjectiveManager: every objective has weight 0 at step {step}")
        losses = self.losses(model, batch, list(weights))
        total = sum(weights[name] * losses[name] for name in weights)
        return total, {name: losses[name].detach() for name in weights}
