"""Training objectives and the ObjectiveManager that weights them (DESIGN.md section 5).

CrossEntropy     next-token CE
DiffusionLM      masked-diffusion loss on the same batch (t ~ U(eps, 1), 1/t weighting)
Distillation     CE, logits KD, attention-relation KD and hidden-state distillation against a frozen
                 teacher, from one forward pass of each model (BitDistill stages 1.9 and 3, LRC)
ObjectiveManager weighted sum, curriculum of weights by phase
"""

from wrinklefree.objectives.distill import (
    Distillation,
    attention_relation_loss,
    hidden_state_loss,
    logits_kd_loss,
)
from wrinklefree.objectives.lm import CrossEntropy, DiffusionLM
from wrinklefree.objectives.manager import ObjectiveManager

__all__ = [
    "CrossEntropy",
    "DiffusionLM",
    "Distillation",
    "ObjectiveManager",
    "attention_relation_loss",
    "hidden_state_loss",
    "logits_kd_loss",
]
