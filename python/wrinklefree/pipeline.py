"""`python -m wrinklefree.pipeline [group=option ...] [key=value ...]`: BitDistill from a teacher to a GGUF file.

Runs the stages of ``training=bitdistill_full`` (or another pipeline recipe, such as ``bitdistill_tiny``, the
quality table on 2 CPU cores) one after the other in this process:

1. the teacher: ``training.teacher``, else ``model.pretrained``; when both are null, one is trained with
   ``training=fp_pretrain`` and saved as a transformers directory, which every stage then starts from;
2. each stage of ``training.stages`` in order, a run of its own recipe (``configs/training/<stage>.yaml``) with
   ``training.common`` and the stage's settings merged in, starting from the previous stage's final checkpoint
   (``experiment`` names the chain; DESIGN.md section 5) and reading the data after that run's
   (``training.data_from``): a student never re-reads its teacher's text. A stage whose final checkpoint
   exists is skipped;
3. the GGUF export of ``training.export.stage``;
4. the held-out perplexity of the teacher, of every stage's model (fully quantized) and of the GGUF file run by
   the CPU engine, with each stage's time and final loss: printed as a table and written to
   ``{output_dir}/runs/{experiment}/pipeline.json`` and ``pipeline.md``.

    python -m wrinklefree.pipeline training=bitdistill_tiny experiment=demo
    python -m wrinklefree.pipeline model=qwen3_0_6b data=fineweb experiment=q06 \\
        training.stages.stage2_pretrain.max_steps=5000

Every other option (model, data, gpu, distributed, output_dir, seed, device) applies to every stage.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from wrinklefree.atomic import atomic_dir, atomic_write_text
from wrinklefree.train.checkpoint import CheckpointManager, stage_dir
from wrinklefree.train.discovery import PREVIOUS_STAGES
from wrinklefree.train.trainer import build_tokenizer, cli_errors

TEACHER_STAGE = "fp_pretrain"
LABELS = {  # the rows of the quality table (the BitDistill issue), by where each model comes from
    "teacher": "(a) teacher, full precision",
    "fp_continue": "(a') teacher trained on in full precision, same budget as (c)",
    "stage1_subln": "(b) teacher ternarized, no training",
    "direct_ternary": "(c) direct ternary training, CE only",
    "stage3_distill": "(d) BitDistill",
    "lrc_calibration": "(e) BitDistill + LRC",
    "gguf": "(f) (d) as GGUF, CPU engine",
}


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One model of the report: where it came from, what it cost, how well it predicts held-out text."""

    name: str
    status: str = ""  # ran | skipped (its output existed) | given
    seconds: float | None = None
    steps: int | None = None
    tokens: int | None = None
    loss_name: str | None = None  # which loss train_loss is (ce, hidden, ...)
    train_loss: float | None = None
    nll: float | None = None
    ppl: float | None = None
    path: str | None = None


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def compose_recipe(stage: str) -> DictConfig:
    """The ``training`` node of recipe ``stage`` (``configs/training/<stage>.yaml``), composed by Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=[f"training={stage}"]).training
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        return compose("config", overrides=[f"training={stage}"]).training


def stage_config(cfg: DictConfig, stage: str, *settings: Any) -> DictConfig:
    """The full config of one stage's run: ``cfg`` with its ``training`` node replaced by the stage's recipe,
    ``settings`` merged in (in order; unknown keys are errors, as on the command line)."""
    training = compose_recipe(stage)
    OmegaConf.set_struct(training, True)
    for s in settings:
        try:
            training = OmegaConf.merge(training, s or {})
        except Exception as e:  # an unknown key, named with its stage
            raise ValueError(f"pipeline: the settings for {stage} do not fit its recipe: {e}") from e
    plain = _container(cfg)
    plain["training"] = _container(training)
    out = OmegaConf.create(plain)
    OmegaConf.set_struct(out, True)
    return out


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """One run of the trainer; returns its summary (see :meth:`Trainer.fit`)."""
    from wrinklefree.train.trainer import Trainer

    trainer = Trainer(cfg)
    finished = False
    try:
        summary = trainer.fit()
        finished = True
        return summary
    finally:
        trainer.close(clean=finished)
        del trainer


def save_teacher(checkpoint: Path, out_dir: Path) -> Path:
    """Write the full-precision model of a trainer checkpoint as a transformers directory (with its tokenizer)."""
    from wrinklefree.train.checkpoint import rebuild_model

    model, tokenizer, cfg = rebuild_model(checkpoint)
    if cfg.training.convert:
        raise ValueError(f"{checkpoint}: a converted (ternary) model cannot serve as the full-precision teacher")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


class Pipeline:
    """The runs, export and evaluation of one pipeline recipe (see the module docstring)."""

    def __init__(self, cfg: DictConfig) -> None:
        pcfg = cfg.training
        if "stages" not in pcfg:
            raise ValueError(
                f"training={pcfg.stage} is a single recipe, not a pipeline: python -m wrinklefree.train "
                f"training={pcfg.stage} (pipelines: training=bitdistill_full, training=bitdistill_tiny)"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "python -m wrinklefree.pipeline runs in one process. On several GPUs, run the stages one by one "
                "(torchrun --nproc_per_node=N -m wrinklefree.train training=STAGE experiment=NAME "
                "distributed=fsdp_multi), then the pipeline with the same experiment: it skips the stages whose "
                "final checkpoint exists and exports and evaluates"
            )
        self.cfg = cfg
        self.pcfg = pcfg
        self.experiment = cfg.experiment or f"{cfg.model.name}-{pcfg.stage}"
        self.root = Path(cfg.output_dir) / "checkpoints" / self.experiment
        self.run_dir = Path(cfg.output_dir) / "runs" / self.experiment
        self.rows: list[Row] = []
        self._tokenizer = None  # every model's: the teacher's, or data.tokenizer
        self._teacher_run: Path | None = None  # the teacher's final trainer checkpoint, when this pipeline trained it

    # ---- stages ----------------------------------------------------------------------------------

    def _base(self) -> DictConfig:
        base = OmegaConf.create(_container(self.cfg))
        base.experiment = self.experiment
        return base

    def _final(self, stage: str) -> Path | None:
        return CheckpointManager(stage_dir(self.cfg.output_dir, self.experiment, stage)).find("final")

    def _recorded(self, stage: str) -> dict[str, Any]:
        """The summary the run of ``stage`` wrote (empty when there is none)."""
        path = self.run_dir / stage / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def _row(name: str, status: str, summary: dict[str, Any], path: str) -> Row:
        return Row(
            name,
            status,
            seconds=summary.get("seconds"),
            steps=summary.get("steps"),
            tokens=summary.get("tokens"),
            loss_name=summary.get("loss_name"),
            train_loss=summary.get("last_loss"),
            path=path,
        )

    def _run(self, name: str, cfg: DictConfig) -> Row:
        """Run one stage, unless its final checkpoint exists."""
        stage = cfg.training.stage
        done = self._final(stage)
        if done is not None:
            _log(f"{name}: skipped, its final checkpoint exists ({done})")
            return self._row(name, "skipped", self._recorded(stage), str(done))
        rcfg = cfg.training.resume
        if not rcfg.checkpoint_path and not self.cfg.get("overwrite"):
            # an earlier pipeline run stopped inside this stage: continue it (overwrite=true starts it again)
            latest = CheckpointManager(stage_dir(self.cfg.output_dir, self.experiment, stage)).latest()
            if latest is not None:
                _log(f"{name}: resuming the unfinished run of {stage} from {latest}")
                rcfg.checkpoint_path = str(latest)
        _log(f"{name}: running {stage} ({cfg.training.max_steps} steps)")
        summary = run_stage(cfg)
        _log(f"{name}: done in {summary['seconds']:.0f} s")
        return self._row(name, "ran", summary, summary["checkpoint"])

    def _data_from(self, stage: str) -> str | None:
        """Where ``stage``'s data starts: after the run its weights come from. A stage that follows another
        continues that one's data (``init``); a stage that starts from the teacher reads what the teacher's
        training did not reach, when this pipeline trained it. So no student trains on the teacher's text,
        and every path from the teacher (stages 1.9 + 2 + 3, the CE-only baseline) reads the same tokens."""
        if PREVIOUS_STAGES.get(stage):
            return "init"
        return str(self._teacher_run) if self._teacher_run is not None else None

    def teacher(self) -> str:
        """The teacher's hub id or directory, training and saving one first when none is configured."""
        given = self.pcfg.get("teacher") or self.cfg.model.pretrained
        if given:
            self.rows.append(Row("teacher", "given", path=str(given)))
            return str(given)
        out_dir = self.root / "teacher"
        if (out_dir / "config.json").is_file():
            _log(f"teacher: skipped, {out_dir} exists")
            self._teacher_run = self._final(TEACHER_STAGE)
            self.rows.append(self._row("teacher", "skipped", self._recorded(TEACHER_STAGE), str(out_dir)))
            return str(out_dir)
        cfg = stage_config(self._base(), TEACHER_STAGE, self.pcfg.common, self.pcfg.teacher_training)
        row = self._run("teacher", cfg)
        self._teacher_run = Path(row.path)
        save_teacher(Path(row.path), out_dir)
        _log(f"teacher: saved as a transformers directory, {out_dir}")
        row.path = str(out_dir)
        self.rows.append(row)
        return str(out_dir)

    def run(self) -> list[Row]:
        """Everything: teacher, stages, export, evaluation, report. Returns the report's rows."""
        start = time.perf_counter()
        if int(self.pcfg.eval.sequences) > 0 and not float(self.cfg.data.eval_fraction) > 0:  # before hours of training
            raise ValueError(
                f"training.eval.sequences={self.pcfg.eval.sequences} evaluates held-out text, and data.eval_fraction "
                f"is {self.cfg.data.eval_fraction}: set data.eval_fraction > 0, or training.eval.sequences=0"
            )
        teacher = self.teacher()
        base = self._base()
        base.model.pretrained = self.cfg.model.pretrained or teacher  # the students start from the teacher
        self._tokenizer = build_tokenizer(base)
        for stage, settings in self.pcfg.stages.items():
            data = {"data_from": self._data_from(stage)}  # before the user's settings, which may change it
            cfg = stage_config(base, stage, data, self.pcfg.common, settings, {"teacher": teacher})
            self.rows.append(self._run(stage, cfg))
        self.export()
        self.evaluate()
        total = time.perf_counter() - start
        self.report(total)
        return self.rows

    # ---- export and evaluation -------------------------------------------------------------------

    def export(self) -> None:
        ecfg = self.pcfg.export
        if not ecfg.stage:
            return
        source = self._final(ecfg.stage)
        if source is None:
            raise ValueError(f"training.export.stage={ecfg.stage}: that stage has no final checkpoint to export")
        from wrinklefree.export.__main__ import export_checkpoint

        suffix = "" if ecfg.outtype == "auto" else f"-{ecfg.outtype}"  # auto: the same type for the same model
        outfile = Path(ecfg.outfile or self.root / f"{ecfg.stage}{suffix}.gguf")
        if outfile.is_file() and outfile.stat().st_mtime >= (source / ".metadata").stat().st_mtime:
            _log(f"export: skipped, {outfile} is newer than {source}")
            self.rows.append(Row("gguf", "skipped", path=str(outfile)))
            return
        start = time.perf_counter()
        export_checkpoint(str(source), str(outfile), ecfg.outtype)
        seconds = time.perf_counter() - start
        _log(f"export: {outfile} ({outfile.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s")
        self.rows.append(Row("gguf", "ran", seconds=seconds, path=str(outfile)))

    def evaluate(self) -> None:
        """Held-out perplexity of every row with a model (trainer checkpoints fully quantized)."""
        n = int(self.pcfg.eval.sequences)
        if n <= 0:
            return
        from wrinklefree.eval import engine_perplexity, heldout_sequences, model_perplexity
        from wrinklefree.inference import Engine
        from wrinklefree.train.teacher import load_teacher

        sequences = heldout_sequences(_container(self.cfg.data), self._tokenizer, n, seed=int(self.cfg.seed))
        dtype = getattr(torch, self.cfg.model.dtype)
        for row in self.rows:
            start = time.perf_counter()
            if row.name == "gguf":
                if not self.pcfg.eval.engine:
                    continue
                result = engine_perplexity(Engine(row.path, n_ctx=int(self.cfg.data.seq_len)), sequences)
            else:  # a frozen model from its path (transformers directory or trainer checkpoint), as a teacher is
                result = model_perplexity(load_teacher(row.path, dtype=dtype, device=torch.device("cpu")), sequences)
            row.nll, row.ppl = result.nll, result.ppl
            _log(f"eval {row.name}: perplexity {result.ppl:.3f} over {result.tokens} tokens "
                 f"({time.perf_counter() - start:.0f} s)")  # fmt: skip

    # ---- report ----------------------------------------------------------------------------------

    def table(self) -> str:
        lines = [
            "| model | run | time (s) | steps | tokens | final train loss | held-out NLL | held-out PPL |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]

        def num(v, fmt):
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        for r in self.rows:
            loss = f"{r.train_loss:.3f} ({r.loss_name})" if r.train_loss is not None else ""
            label = LABELS.get(r.name, r.name)
            if r.name in LABELS and r.name not in ("teacher", "gguf"):
                label = f"{label} [{r.name}]"
            lines.append(
                f"| {label} | {r.status} | {num(r.seconds, '.0f')} | {num(r.steps, 'd')} | {num(r.tokens, ',d')} | "
                f"{loss} | {num(r.nll, '.4f')} | {num(r.ppl, '.2f')} |"
            )
        return "\n".join(lines)

    def report(self, total_seconds: float) -> None:
        table = self.table()
        record = {
            "experiment": self.experiment,
            "recipe": self.pcfg.stage,
            "total_seconds": total_seconds,
            "eval_sequences": int(self.pcfg.eval.sequences),
            "seq_len": int(self.cfg.data.seq_len),
            "rows": [asdict(r) for r in self.rows],
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "pipeline.json", json.dumps(record, indent=2) + "\n")
        atomic_write_text(self.run_dir / "pipeline.md", table + "\n")
        head = f"Pipeline {self.experiment} ({self.pcfg.stage}) in {total_seconds / 60:.1f} min"
        print(f"\n{head}:\n\n{table}\n", flush=True)
        print(f"  report: {self.run_dir}/pipeline.json, pipeline.md", flush=True)


def run_pipeline(cfg: DictConfig) -> list[Row]:
    """Run the pipeline recipe of ``cfg`` (``cfg.training`` has ``stages``); returns the report's rows."""
    return Pipeline(cfg).run()


@hydra.main(config_path="pkg://wrinklefree.configs", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors():  # a bad setting: one line "error: ..." and exit code 2
        run_pipeline(cfg)


if __name__ == "__main__":
    main()
