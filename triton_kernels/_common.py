"""Pieces shared by the Triton kernels: exact rounding, the pairwise float64 tree, launch options.

Bit-exactness with :mod:`wrinklefree.ops.reference` rests on three rules, checked by the tests on
the PTX of every kernel:

* no floating-point contraction: kernels launch with ``enable_fp_fusion=False``, otherwise a
  multiply followed by the rounding add below becomes one ``fma`` with a single rounding;
* IEEE division and square root where the reference divides (``tl.div_rn``, ``tl.sqrt_rn``);
* round half to even by the float32 "magic number": for ``|y| <= 2**22``, ``(y + 1.5 * 2**23) -
  1.5 * 2**23`` is ``y`` rounded to an integer, ties to even (the add rounds in the
  round-to-nearest-even mode IEEE arithmetic uses). Callers clamp ``y`` to the int8 range first,
  which gives the same result as clamping after rounding because the bounds are integers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from wrinklefree.ops.reference import PAIR_CHUNK  # noqa: F401  (the kernels' block: the reference's)

# Launch options of every kernel that must agree with the reference bit for bit.
EXACT = {"enable_fp_fusion": False}


@triton.jit
def round_half_even(y):
    """``y`` (float32, |y| <= 2**22) rounded to an integer value, ties to even."""
    magic = 12582912.0  # 1.5 * 2**23
    return (y + magic) - magic


@triton.jit
def pairwise_tree(v, LOG2: tl.constexpr):
    """Pairwise sum of the 2**LOG2 elements of the 1-D ``v``: neighbours added level by level, the
    order :func:`wrinklefree.ops.reference.pairwise_sum` defines. A sum over an axis of two elements
    is one addition, so the order inside each level cannot change the bits."""
    for _ in tl.static_range(LOG2):
        v = tl.sum(tl.reshape(v, (v.shape[0] // 2, 2)), axis=1)
    return tl.sum(v, axis=0)


def log2_ceil(n: int) -> int:
    return max(n - 1, 0).bit_length()
