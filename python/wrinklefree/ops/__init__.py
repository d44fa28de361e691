"""The one door to the kernels.

Every op is a ``torch.library`` custom op (``torch.ops.wrinklefree.*``) with a fake kernel for
torch.compile, a compiled CPU kernel, and a plain-PyTorch reference in :mod:`.reference` that
defines its result bit for bit. ``WF_OPS_BACKEND=reference`` (or :func:`set_backend`) runs the
references instead of the kernels.

Quantization (DESIGN.md section 2):
    ternary_quant(w) -> (codes int8, scale)            absmean, per tensor
    act_quant_int8(x) -> (q int8 [N, K], scale [N])    absmax, per row
    rmsnorm_act_quant(x, weight, eps) -> (q, scale)    fused SubLN + act quant

Packed formats (DESIGN.md section 3):
    pack(codes, scale, fmt) -> uint8                   fmt in FORMATS: i2_s, tq2_0, tq1_0
    unpack(buf, shape, fmt) -> (codes, scale)

Training (fused, straight-through backward; DESIGN.md section 2):
    bitlinear_train(x, weight, norm_weight, eps) -> float32 [N, M]   lam = 1 BitLinear, int8 x ternary
    relu2_glu(gate, up) -> relu(gate)^2 * up

Matmul on packed I2_S weights:
    i2s_matmul(q, x_scale, packed, out_features) -> float32 [N, M]
    bitlinear_infer(x, packed, out_features) -> float32 [N, M]
"""

from wrinklefree.ops._backend import get_backend, set_backend
from wrinklefree.ops.cpu import (
    MAX_THREADS,
    get_isa,
    get_num_threads,
    int8_mac_rate,
    read_bandwidth,
    set_isa,
    set_num_threads,
    supported_isas,
)
from wrinklefree.ops.i2s import bitlinear_infer, i2s_matmul
from wrinklefree.ops.packing import FORMATS, PackedFormat, get_format, pack, unpack
from wrinklefree.ops.quant import act_quant_int8, rmsnorm_act_quant, ternary_quant
from wrinklefree.ops.train import bitlinear_train, relu2_glu

__all__ = [
    "FORMATS",
    "MAX_THREADS",
    "PackedFormat",
    "act_quant_int8",
    "bitlinear_infer",
    "bitlinear_train",
    "get_backend",
    "get_format",
    "get_isa",
    "get_num_threads",
    "i2s_matmul",
    "int8_mac_rate",
    "pack",
    "read_bandwidth",
    "relu2_glu",
    "rmsnorm_act_quant",
    "set_backend",
    "set_isa",
    "set_num_threads",
    "supported_isas",
    "ternary_quant",
    "unpack",
]
