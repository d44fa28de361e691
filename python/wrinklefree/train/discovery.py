"""Stage discovery: each training stage starts from the previous stage's ``final`` checkpoint (DESIGN.md section 5).

The previous stages (:data:`PREVIOUS_STAGES`; the first one found wins)::

    stage               starts from                          why
    stage1_subln        -                                    converts the configured / pretrained model
    stage1_9_layerwise  stage1_subln
    stage2_pretrain     stage1_9_layerwise, stage1_subln     stage 1.9 is optional
    stage3_distill      stage2_pretrain
    lrc_calibration     stage3_distill, stage2_pretrain      the final ternary model; adds lrc_u / lrc_v
    direct_ternary      stage1_subln                         the CE-only baseline of the quality table
    fp_continue         -                                    the configured model trained on, unconverted
    unified             -                                    a recipe of its own, from the model config
    fp_pretrain         -                                    the full-precision baseline

For each candidate stage in that order, the places looked at, in order:

1. local: ``{output_dir}/checkpoints/{experiment}/{prev}_checkpoint/checkpoints/final``;
2. remote: the same path under ``training.remote_dir`` (an fsspec URL such as ``gs://bucket/wrinklefree``),
   taken only with its completion marker (see :mod:`wrinklefree.train.checkpoint`);
3. the hub: the folder ``checkpoints/{experiment}/{prev}_checkpoint/checkpoints/final`` of the repo
   ``training.hub_repo`` (``owner/name[@revision]``), fetched alone with ``snapshot_download``.

A candidate found anywhere beats a later candidate found locally: the most trained model wins.

``training.init_from``:

- ``auto``: the above, for the run's ``experiment`` (which must be set, since generated run names
  differ per stage); when nothing is found the run starts from the model config. Either way it says
  what it found and used.
- ``none`` (or null): start from the model config.
- a stage name, e.g. ``stage2_pretrain``: that stage's ``final``, looked up as above (an error if absent).
- a checkpoint directory, fsspec URL or ``hf://owner/name[@revision]/subdir``: that checkpoint.

Only the model weights are loaded (not the optimizer, schedules, data position or RNG); the keys and
shapes must match the model built from the config, except the parameters the stage adds
(:data:`ADDED_PARAMETERS`) and ``training.init_allow_missing``. A resumed run
(``training.resume.checkpoint_path``) takes its weights from the resumed checkpoint instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from wrinklefree.train.checkpoint import (
    CheckpointManager,
    hub_download,
    is_complete,
    is_url,
    load_weights,
    on_rank0,
    stage_dir,
)

PREVIOUS_STAGES: dict[str, tuple[str, ...]] = {
    "stage1_subln": (),
    "stage1_9_layerwise": ("stage1_subln",),
    "stage2_pretrain": ("stage1_9_layerwise", "stage1_subln"),
    "stage3_distill": ("stage2_pretrain",),
    "lrc_calibration": ("stage3_distill", "stage2_pretrain"),
    "direct_ternary": ("stage1_subln",),
    "fp_continue": (),
    "unified": (),
    "fp_pretrain": (),
}
"""Stage -> the stages whose ``final`` checkpoint it starts from, most preferred first. (Pipeline recipes,
such as bitdistill_full, are chains of these stages, not stages: see :mod:`wrinklefree.pipeline`.)"""

ADDED_PARAMETERS: dict[str, tuple[str, ...]] = {
    # BitLinearLRC starts U at zero, so keeping the built correction leaves the loaded model's function as is
    "lrc_calibration": ("*.lrc_u", "*.lrc_v"),
}
"""Stage -> ``fnmatch`` patterns of model keys the previous stage's checkpoint does not have."""

Log = Callable[[str], None]


def hub_spec(hub_repo: str, experiment: str, stage: str) -> str:
    """``hf://{hub_repo}/checkpoints/{experiment}/{stage}_checkpoint/checkpoints/final``: the repo mirrors
    the local layout under its root."""
    return f"hf://{hub_repo.strip('/')}/{stage_dir('', experiment, stage).as_posix()}/final"


def find_stage_checkpoint(
    stages: Sequence[str],
    experiment: str,
    output_dir: str | os.PathLike,
    remote_dir: str | None = None,
    hub_repo: str | None = None,
) -> tuple[str | None, str | None, list[str]]:
    """Look for the ``final`` checkpoint of each of ``stages`` in turn: locally, under ``remote_dir``, on the hub.

    Returns:
        ``(where, stage, looked)``: the checkpoint (a local path, fsspec URL or ``hf://`` spec) and
        its stage, or ``(None, None, looked)``; ``looked`` lists every place tried, in order.

    Raises:
        whatever the remote storage or the hub raises for other reasons than a missing checkpoint
        (credentials, network, an unknown repo): a lookup that could not be made is not "none found".
    """
    looked: list[str] = []
    for stage in stages:
        local_dir = Path(stage_dir(output_dir, experiment, stage))
        looked.append(str(local_dir / "final"))
        local = CheckpointManager(local_dir).find("final")
        if local is not None:
            return str(local), stage, looked
        if remote_dir:
            url = f"{stage_dir(remote_dir, experiment, stage)}/final"
            looked.append(url)
            if is_complete(url):
                return url, stage, looked
        if hub_repo:
            spec = hub_spec(hub_repo, experiment, stage)
            looked.append(spec)
            if (hub_download(spec) / ".metadata").is_file():
                return spec, stage, looked
    return None, None, looked


def _resume_source(cfg: DictConfig, manager: CheckpointManager) -> Any:
    """What ``_maybe_resume`` will load (None: no resume), by the same rule."""
    path = cfg.training.resume.checkpoint_path
    if not path:
        return None
    return manager.latest() if path == "latest" else path


def setup_checkpoints(
    cfg: DictConfig, manager: CheckpointManager, model: nn.Module, run_name: str, log: Log = print
) -> str | None:
    """Mirror ``manager`` to ``training.remote_dir`` and load the weights ``training.init_from`` names.

    Called once by the trainer on every rank, after the model is wrapped (FSDP2 shards are filled in
    place, each rank reading its own) and before resume handling (so that ``resume=latest`` also
    looks in the remote directory, and a resumed run skips the initial weights).

    Returns:
        the checkpoint the weights came from, or None (the model config's weights).
    """
    tcfg = cfg.training
    if tcfg.get("remote_dir"):
        manager.mirror_to(str(stage_dir(str(tcfg.remote_dir), run_name, tcfg.stage)))
        log(f"checkpoints are also written to {manager.remote}")

    init = tcfg.get("init_from")
    init = None if init is None or str(init).lower() in ("none", "null", "") else str(init)
    if init is None:
        return None
    resumed = _resume_source(cfg, manager)
    if resumed is not None:
        if init != "auto":
            log(f"training.init_from={init} is not used: the run resumes from {resumed}")
        return None

    allow = [*ADDED_PARAMETERS.get(tcfg.stage, ()), *(tcfg.get("init_allow_missing") or ())]
    if init == "auto" or init in PREVIOUS_STAGES:
        stages = PREVIOUS_STAGES.get(tcfg.stage, ()) if init == "auto" else (init,)
        if not stages:
            return None  # nothing comes before this stage: the model config is where it starts
        if not cfg.experiment:
            if init != "auto":
                raise ValueError(f"training.init_from={init}: set experiment=NAME to say whose checkpoint to use")
            log(
                f"init_from=auto: {tcfg.stage} would start from {' or '.join(stages)}'s final checkpoint, but "
                "experiment is not set (generated run names differ per stage); starting from the model config"
            )
            return None

        def look() -> tuple[str | None, str | None, list[str]]:
            return find_stage_checkpoint(
                stages, cfg.experiment, cfg.output_dir, tcfg.get("remote_dir"), tcfg.get("hub_repo")
            )

        # rank 0 looks, so that every rank loads the same checkpoint
        source, found, looked = on_rank0(look, f"training.init_from={init}: the lookup")
        if source is None:
            where = "; ".join(looked)
            if init != "auto":
                raise FileNotFoundError(f"training.init_from={init}: no final checkpoint of {init} (looked in {where})")
            log(
                f"init_from=auto: no final checkpoint of {' or '.join(stages)} for experiment {cfg.experiment} "
                f"(looked in {where}); starting from the model config"
            )
            return None
        what = f"init_from={init}: {tcfg.stage} starts from {found}'s final checkpoint {source}"
    else:
        source = init
        what = f"init_from: starting from {source}"

    if source.startswith("hf://"):
        on_rank0(lambda: str(hub_download(source)), f"download of {source}")  # rank 0 fills the cache first
    try:
        n = load_weights(source, model, allow_missing=allow)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"training.init_from={init}: {e}") from e
    kind = "hub" if source.startswith("hf://") else "remote" if is_url(source) else "local"
    log(f"{what} ({kind}; {n} weight tensors; optimizer, schedules and data start fresh)")
    return source
