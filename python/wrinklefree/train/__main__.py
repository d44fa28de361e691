"""`python -m wrinklefree.train [group=option ...] [key=value ...]`: the Hydra entry point.

With no arguments it converts the tiny model to BitNet and trains it with the unified recipe on
the built-in corpus, on whatever device is present. See configs/ for the groups (model,
training, data, distributed, gpu) and `--help` / `--cfg job` for the composed config. A pipeline
recipe (training=bitdistill_full, bitdistill_tiny) runs its chain of stages, as
`python -m wrinklefree.pipeline` does.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="pkg://wrinklefree.configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from wrinklefree.train.trainer import cli_errors

    with cli_errors():  # a bad setting: one line "error: ..." and exit code 2
        run(cfg, overrides=list(HydraConfig.get().overrides.task))


def run(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """One run of ``cfg`` (a pipeline recipe: its chain of stages); ``overrides``: the command line's."""
    if "stages" in cfg.training:
        from wrinklefree.pipeline import run_pipeline

        run_pipeline(cfg)
        return
    from wrinklefree.train.trainer import Trainer

    trainer = Trainer(cfg, overrides=overrides)
    finished = False
    try:
        trainer.fit()
        finished = True
    finally:
        trainer.close(clean=finished)


if __name__ == "__main__":
    main()
