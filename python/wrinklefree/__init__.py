"""WrinkleFree: ternary (1.58-bit) LLMs, from a Hugging Face model to a fast ternary model.

    from wrinklefree import BitLinear, convert

Layers: :mod:`wrinklefree.ops` (kernels), :mod:`wrinklefree.nn` (BitLinear, SubLN, LRC, MoE,
Q-Sparse), :mod:`wrinklefree.models` (convert, transformers `bitnet` checkpoints). Importing the
package never touches a GPU and does not import transformers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wrinklefree")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from wrinklefree import nn, ops  # noqa: E402
from wrinklefree.models import convert  # noqa: E402
from wrinklefree.nn import BitLinear, BitLinearLRC, QSparse, QuantSchedule, SubLN, pack_model  # noqa: E402

__all__ = [
    "BitLinear",
    "BitLinearLRC",
    "QSparse",
    "QuantSchedule",
    "SubLN",
    "__version__",
    "convert",
    "nn",
    "ops",
    "pack_model",
]
