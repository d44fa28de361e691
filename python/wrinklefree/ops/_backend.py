"""Loading of the compiled cores and the choice of backend.

``wrinklefree._C`` (C++ CPU kernels) is always built. ``wrinklefree._C_cuda`` is built where a CUDA
toolkit was found; it is loaded lazily, only when a CUDA tensor asks for it, so importing the
package never fails on a machine without a GPU or driver.

``WF_OPS_BACKEND=reference`` makes every op run its plain-PyTorch reference instead of a kernel
(for debugging and comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from wrinklefree import _C  # noqa: F401  (the compiled CPU core; its absence is a broken install)

_BACKENDS = ("native", "reference")


def _backend_from_env() -> str:
    value = os.environ.get("WF_OPS_BACKEND", "native")
    if value not in _BACKENDS:
        raise ValueError(f"WF_OPS_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


_backend = _backend_from_env()


def get_backend() -> str:
    """'native' (compiled kernels where a device has them) or 'reference' (plain PyTorch)."""
    return _backend


def set_backend(name: str) -> None:
    """Choose 'native' or 'reference' for all ops in this process."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def use_native() -> bool:
    return _backend == "native"


# ---- argument checks shared by the ops --------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODE[t.dtype]


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype],
    ndim: int | None = None,
    contiguous: bool = True,
) -> None:
    """Raise TypeError/ValueError naming ``op`` and the argument ``name`` when ``t`` does not fit."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
