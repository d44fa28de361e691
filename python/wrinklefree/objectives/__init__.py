"""Training objectives and the ObjectiveManager that weights them (DESIGN.md section 5).

CrossEntropy     next-token CE
DiffusionLM      masked-diffusion loss on the same batch (t ~ U(eps, 1), 1/t weighting)
ObjectiveManager weighted sum, curriculum of weights by phase
"""

from wrinklefree.objectives.lm import CrossEntropy, DiffusionLM
from wrinklefree.objectives.manager import ObjectiveManager

__all__ = ["CrossEntropy", "DiffusionLM", "ObjectiveManager"]
