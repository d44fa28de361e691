"""nn.Modules built on the ops: BitLinear and its relatives.

BitLinear        drop-in nn.Linear with ternary weights and int8 activations (STE); .pack() for I2_S
BitLinearLRC     BitLinear + trainable low-rank correction on the unquantized input
SubLN            the RMSNorm before a BitLinear
QSparse          top-k / N:M activation sparsity at BitLinear inputs
QuantSchedule    the shared, checkpointable quantization warm-up factor
reset_added_parameters  initialize SubLN / LRC parameters of a model converted on the meta device
moe              TopKRouter, IdentityRouter, BitNetExpertFFN, BitNetMoEFFN
"""

from wrinklefree.nn.bitlinear import (
    BitLinear,
    BitLinearLRC,
    bitlinear_modules,
    lrc_rank,
    pack_model,
    reset_added_parameters,
    set_schedule,
)
from wrinklefree.nn.moe import (
    EXPERT_ACTIVATIONS,
    ROUTER_KINDS,
    BitNetExpertFFN,
    BitNetMoEFFN,
    IdentityRouter,
    TopKRouter,
    create_fake_moe_from_dense,
    verify_moe_matches_dense,
)
from wrinklefree.nn.qsparse import QSPARSE_MODES, QSparse
from wrinklefree.nn.schedule import SCHEDULE_KINDS, QuantSchedule
from wrinklefree.nn.subln import SubLN

__all__ = [
    "EXPERT_ACTIVATIONS",
    "QSPARSE_MODES",
    "ROUTER_KINDS",
    "SCHEDULE_KINDS",
    "BitLinear",
    "BitLinearLRC",
    "BitNetExpertFFN",
    "BitNetMoEFFN",
    "IdentityRouter",
    "QSparse",
    "QuantSchedule",
    "SubLN",
    "TopKRouter",
    "bitlinear_modules",
    "create_fake_moe_from_dense",
    "lrc_rank",
    "pack_model",
    "reset_added_parameters",
    "set_schedule",
    "verify_moe_matches_dense",
]
