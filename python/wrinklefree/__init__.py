"""WrinkleFree: ternary (1.58-bit) LLMs, from a Hugging Face model to a fast ternary model.

The kernel ops live in :mod:`wrinklefree.ops`. Importing the package never touches a GPU.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wrinklefree")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from wrinklefree import ops  # noqa: E402

__all__ = ["ops", "__version__"]
