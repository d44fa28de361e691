"""Loading of the compiled cores and the choice of backend.

``wrinklefree._C`` (C++ CPU kernels) is always built. ``wrinklefree._C_cuda`` is built where a CUDA
toolkit was found; it is loaded lazily, only when a CUDA tensor asks for it, so importing the
package never fails on a machine without a GPU or driver.

``WF_OPS_BACKEND=reference`` makes every op run its plain-PyTorch reference instead of a kernel
(for debugging and comparisons).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

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


@functools.cache
def cuda_core() -> ModuleType | None:
    """The compiled CUDA core ``wrinklefree._C_cuda``, or None where it was not built (cached).

    Called by the ops' CUDA kernels only, so the module is first imported when a CUDA tensor
    arrives. Where the module exists but cannot serve (it fails to import, or its statically linked
    CUDA runtime is newer than the driver, while torch's own runtime works) this warns once and
    returns None, so the ops fall back to the reference instead of failing.
    """
    try:
        core = importlib.import_module("wrinklefree._C_cuda")
    except ModuleNotFoundError as e:
        if e.name != "wrinklefree._C_cuda":
            raise
        return None  # built without CUDA (no toolkit, or WF_CUDA=off)
    except ImportError as e:
        warnings.warn(
            f"wrinklefree._C_cuda is installed but does not import ({e}); CUDA ops run the "
            "plain-PyTorch reference. Rebuild with `pip install .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if torch.cuda.is_available():
        status = core.runtime_status()
        if status != "cudaSuccess":
            warnings.warn(
                f"wrinklefree._C_cuda (built with CUDA runtime {core.cuda_runtime_version}) cannot use "
                f"this machine's GPUs: {status} (driver supports CUDA {core.driver_version()}); CUDA ops "
                "run the plain-PyTorch reference. Rebuild with a CUDA toolkit the driver supports.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
    return core


@functools.cache
def triton_kernels() -> ModuleType | None:
    """:mod:`wrinklefree.triton_kernels` (imported on first use, cached), or None where Triton is
    not installed. The ops' CUDA kernels use it first; without it they use ``_C_cuda`` or the
    reference."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    module = importlib.import_module("wrinklefree.triton_kernels")
    for name in ("quant", "bitlinear", "glu"):
        importlib.import_module(f"wrinklefree.triton_kernels.{name}")
    return module


def triton_for(t: torch.Tensor) -> ModuleType | None:
    """:func:`triton_kernels` for an op on ``t``: only for CUDA tensors, with the native backend on."""
    return triton_kernels() if t.is_cuda and use_native() else None


def eager_cpu(*tensors: object) -> bool:
    """True when a call can skip the dispatcher and run the CPU kernel directly.

    The torch.library dispatcher costs ~10 us per call, as much as a decode-sized matmul. That
    path is only needed for tracing (torch.compile), tensor subclasses and dispatch/function
    modes (FakeTensorMode, DTensor, profilers' modes), torch.func transforms, other devices, or autograd; for plain CPU
    tensors in eager mode the public functions call the registered CPU kernel themselves, which
    gives the same result.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_cpu or t.requires_grad:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):  # vmap / torch.func: their rules apply
            return False
    return not torch.overrides.has_torch_function(tensors)


def call_op(op: Callable, cpu_kernel: Callable, check: Callable, args: tuple, n_tensors: int) -> Any:
    """Run a public op: ``cpu_kernel(*args)`` directly when :func:`eager_cpu` holds for the first
    ``n_tensors`` args (the kernel checks its arguments itself), else ``check(*args)`` (clearer
    errors than the dispatcher's for non-tensors) and the custom op through the dispatcher.
    """
    if eager_cpu(*args[:n_tensors]):
        return cpu_kernel(*args)
    check(*args)
    return op(*args)


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
    values = iter(tensors.values())
    device = next(values).device
    if any(t.device != device for t in values):  # cheap on the common path: no allocation
        listed = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
