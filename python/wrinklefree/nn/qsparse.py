"""Q-Sparse: top-k activation sparsity at BitLinear inputs (DESIGN.md section 5).

Each token keeps its ``K - round(ratio * K)`` largest-magnitude inputs and zeroes the rest
("topk"), or keeps the ``n`` largest in every block of ``block_size`` consecutive inputs, with
``n = block_size - round(ratio * block_size)`` ("block", N:M sparsity). The gradient passes
straight through to every input. With ``warmup_steps`` the ratio rises linearly from 0 over that
many steps of the model's :class:`~wrinklefree.nn.QuantSchedule`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wrinklefree.nn.schedule import QuantSchedule
from wrinklefree.ops.fake_quant import straight_through

QSPARSE_MODES = ("topk", "block")


class QSparse(nn.Module):
    """Top-k sparsification of activations [..., K] over the last dim, with the STE.

    Args:
        ratio: target fraction of zeros, in [0, 1) (default 0.61, the Q-Sparse ternary setting).
        mode: "topk" (per token) or "block" (N:M within blocks of ``block_size``).
        block_size: M of N:M; K must be a multiple of it in "block" mode.
        warmup_steps: steps over which the ratio rises from 0 to ``ratio`` (0: from the start).
        schedule: the schedule whose step drives the warm-up (set by ``convert``).
    """

    def __init__(
        self,
        ratio: float = 0.61,
        mode: str = "topk",
        block_size: int = 8,
        warmup_steps: int = 0,
        schedule: QuantSchedule | None = None,
    ) -> None:
        super().__init__()
        for name, value, kind in (("ratio", ratio, (int, float)), ("block_size", block_size, int),
                                  ("warmup_steps", warmup_steps, int)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(
                    f"QSparse: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
                )
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"QSparse: ratio must be in [0, 1), got {ratio!r}")
        if mode not in QSPARSE_MODES:
            raise ValueError(f"QSparse: mode must be one of {QSPARSE_MODES}, got {mode!r}")
        if block_size < 2:
            raise ValueError(f"QSparse: block_size must be >= 2, got {block_size!r}")
        if warmup_steps < 0:
            raise ValueError(f"QSparse: warmup_steps must be >= 0, got {warmup_steps!r}")
        self.ratio = float(ratio)
        self.mode = mode
        self.block_size = int(block_size)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule

    def current_ratio(self) -> float:
        """The ratio in force now: the target, scaled down during warm-up."""
        if self.warmup_steps == 0:
            return self.ratio
        step = self.schedule.current_step if self.schedule is not None else self.warmup_steps
        return self.ratio * min(step / self.warmup_steps, 1.0)

    def kept(self, k: int) -> int:
        """How many of ``k`` values (a row in topk mode, a block in block mode) are kept."""
        return k - round(self.current_ratio() * k)

    def _count_from_tensor(self) -> bool:
        # Compiled with a warm-up: the count changes every warm-up step, and any read of the schedule's int
        # step would make torch.compile recompile at each; the step tensor does not (after the warm-up it
        # holds the full ratio; the cost is a sort of each row instead of topk).
        return torch.compiler.is_compiling() and self.warmup_steps > 0 and self.schedule is not None

    def check_input_size(self, k: int, where: str = "", prefix: str = "QSparse:") -> None:
        """Raise ValueError unless inputs of ``k`` values can be sparsified (block mode: k a multiple of
        block_size); the message starts with ``prefix`` and names the layer ``where``."""
        if self.mode == "block" and k % self.block_size:
            at = f" of {where}" if where else ""
            raise ValueError(f"{prefix} block_size={self.block_size} does not divide the {k} inputs{at}")

    def forward(self, x: Tensor) -> Tensor:
        k = x.shape[-1]
        self.check_input_size(k)
        n = k if self.mode == "topk" else self.block_size  # a row, or a block, keeps its largest
        counted = self._count_from_tensor()
        if not counted and self.kept(n) == n:
            return x
        a = x.detach().abs()
        if self.mode == "block":
            a = a.unflatten(-1, (k // n, n))
        if counted:  # the same float64 arithmetic as kept()
            ratio = self.ratio * torch.clamp(self.schedule.step_tensor / self.warmup_steps, max=1.0)
            keep = n - torch.round(ratio * n)
            order = a.argsort(dim=-1, descending=True, stable=True)
            ranks = torch.arange(n, device=a.device).expand_as(a)
            mask = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, order, ranks < keep.to(a.device))
        else:
            idx = a.topk(self.kept(n), dim=-1, sorted=False).indices
            mask = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)
        return straight_through(x.detach() * mask.reshape(x.shape), x)

    def extra_repr(self) -> str:
        extra = f", block_size={self.block_size}" if self.mode == "block" else ""
        return f"ratio={self.ratio}, mode={self.mode!r}{extra}, warmup_steps={self.warmup_steps}"
