"""Process group, device and model wrapping (FSDP2 or DDP) for the trainer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass
class DistContext:
    """Where this process runs: rank, world size and device."""

    strategy: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(strategy: str, device_preference: str, backend: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (or for ddp/fsdp), pick the device."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "single" and world_size > 1:
        raise ValueError(
            f"launched with {world_size} processes but distributed=single; "
            "use distributed=ddp or distributed=fsdp_multi"
        )
    device = pick_device(device_preference, local_rank)
    if strategy != "single" and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ:  # a plain `python -m` start: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(strategy, rank, world_size, local_rank, device)


def teardown(clean: bool = True) -> None:
    """Destroy the process group, if there is one.

    ``clean``: this rank finished its work normally. Then every rank first meets at a barrier, so none
    closes its connections while a peer is still in a collective (gloo aborts that peer: "terminate
    called without an active exception"). After an error there is no barrier: the other ranks may be
    inside a collective this rank will never join, and would wait for it forever.
    """
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def wrap(model: nn.Module, ctx: DistContext, cfg: dict) -> nn.Module:
    """FSDP2 (one shard group per decoder layer plus the root), DDP, or nothing."""
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        mp_cfg = cfg.get("mixed_precision") or {}
        if ctx.device.type == "cuda" and mp_cfg:
            mp = MixedPrecisionPolicy(
                param_dtype=getattr(torch, mp_cfg.get("param_dtype", "bfloat16")),
                reduce_dtype=getattr(torch, mp_cfg.get("reduce_dtype", "float32")),
            )
        kw = {"reshard_after_forward": cfg.get("reshard_after_forward", True)}
        if mp is not None:
            kw["mp_policy"] = mp
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)  # SUM: the one reduction every backend has
        value /= dist.get_world_size()
    return value
