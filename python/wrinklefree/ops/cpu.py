"""CPU runtime controls: instruction set, threads, and a read-bandwidth probe for benchmarks."""

from __future__ import annotations

from wrinklefree import _C

MAX_THREADS: int = _C.MAX_THREADS  # the most threads set_num_threads takes


def supported_isas() -> list[str]:
    """Instruction sets this CPU can run, best first (subset of avx512, avx2, scalar)."""
    return list(_C.supported_isas())


def get_isa() -> str:
    """The instruction set the CPU kernels use now (default: the best supported, or WF_CPU_ISA)."""
    return str(_C.active_isa())


def set_isa(name: str) -> None:
    """Force the CPU kernels onto one instruction set: 'avx512' (with VNNI), 'avx2' or 'scalar'.

    All give identical integer results; this exists for tests and comparisons.
    """
    _C.set_isa(name)


def get_num_threads() -> int:
    """Threads the CPU kernels use (default: WF_NUM_THREADS, else the CPUs this process may use)."""
    return int(_C.num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels (independent of torch.set_num_threads)."""
    _C.set_num_threads(int(n))


def read_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Read bandwidth in bytes/s of the kernel threads streaming ``nbytes`` (best of ``reps``).

    A read-only pass (no writes), the bound for memory-bound kernels such as decode matmuls.
    """
    return float(_C.read_bandwidth(int(nbytes), int(reps)))


def int8_mac_rate(seconds: float = 0.2) -> float:
    """Peak int8 multiply-adds/s of the active ISA's matmul instruction (AVX-512 vpdpbusd, AVX2
    vpmaddubsw, scalar) on all kernel threads, run from registers for about ``seconds``: the
    compute ceiling of the I2_S prefill matmul.
    """
    return float(_C.int8_mac_rate(float(seconds)))
