"""The training loop: model, data, objectives, optimizer, checkpoints and logging from one config."""

from __future__ import annotations

import contextlib
import gc
import importlib.resources
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from wrinklefree.atomic import atomic_write_text
from wrinklefree.models import convert
from wrinklefree.models.hf_bitnet import bitnet_blocker
from wrinklefree.nn import QuantSchedule
from wrinklefree.objectives import CrossEntropy, DiffusionLM, Distillation, ObjectiveManager
from wrinklefree.train import distributed
from wrinklefree.train.checkpoint import TOKENIZER_DIR, CheckpointManager, on_rank0, read_trainer_state, stage_dir
from wrinklefree.train.metrics import MetricsLogger, run_name
from wrinklefree.train.optim import ZClip, build_lr_scheduler, build_optimizer

GPU_TABLE_MIN_GB = (("h100_80gb", 75), ("a100_40gb", 35), ("a10g_24gb", 20))
DISTILLATION = ("logits_kd", "attention_kd", "hidden")  # the objectives that need the teacher
OBJECTIVES = ("ce", "dlm", *DISTILLATION)
MODEL_KEYS = ("model", "training.convert", "training.lrc_rank")
"""The config that decides the model a checkpoint's weights belong to: a resumed run must have the same."""
NEXT_RUN_KEYS = ("experiment", "training.resume.checkpoint_path", "training.max_steps", "overwrite")
"""The overrides the printed "train longer" command sets itself (replacing the run's own), or leaves out
(``overwrite``, which a resumed run ignores)."""
INT_SETTINGS = (  # (key, minimum, what null means, None: not allowed): checked at start-up, named in the error
    ("training.max_steps", 0, None),
    ("training.quant_warmup.steps", 0, None),
    ("training.lr_schedule.warmup_steps", 0, None),
    ("training.log_every", 1, None),
    ("training.eval_every", 0, "never"),
    ("training.save_every", 0, "only the final checkpoint"),
    ("training.eval_batches", 0, None),
    ("training.keep_checkpoints", 0, None),
    ("data.seq_len", 1, None),
)
NUMBER_SETTINGS = (  # (key, minimum, maximum or None)
    ("training.optimizer.lr", 0.0, None),
    ("training.grad_clip", 0.0, None),
    ("data.eval_fraction", 0.0, 0.5),
)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def int_setting(cfg: DictConfig, key: str, minimum: int, null: str | None = None) -> int | None:
    """The integer at the dotted ``key`` of ``cfg``, checked: ``>= minimum``; None when it is null and ``null``
    (what null means, for the error message) is given."""
    value = OmegaConf.select(cfg, key)
    if value is None and null is not None:
        return None
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < minimum:
        alternative = f" or null ({null})" if null is not None else ""
        raise ValueError(f"{key} must be an integer >= {minimum}{alternative}, got {value!r}")
    return int(value)


def check_settings(cfg: DictConfig) -> None:
    """Reject missing values and bad numbers at start-up, naming the key (rather than failing deep inside, or
    running 0 steps)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key or "a key"
        raise ValueError(f"{key} has no default: set it on the command line ({key}=...)") from None
    for key, minimum, null in INT_SETTINGS:
        int_setting(cfg, key, minimum, null)
    for key, minimum, maximum in NUMBER_SETTINGS:
        value = OmegaConf.select(cfg, key)
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if not number or not minimum <= value <= (math.inf if maximum is None else maximum):
            allowed = f">= {minimum:g}" if maximum is None else f"in [{minimum:g}, {maximum:g}]"
            raise ValueError(f"{key} must be a number {allowed}, got {value!r}")
    if OmegaConf.select(cfg, "model.dtype") == "float16":
        raise ValueError(
            "model.dtype=float16: float16 weights trained without loss scaling overflow within a few steps; "
            "use model.dtype=bfloat16 (or float32; on a GPU the forward runs under bf16 autocast either way)"
        )


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def model_settings(config: dict) -> dict[str, Any]:
    """The :data:`MODEL_KEYS` of a resolved config (a plain dict), flattened to dotted keys."""
    out: dict[str, Any] = {}
    for key in MODEL_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.update(_flatten(node, key))
    return out


def override_value(value: Any) -> str:
    """``value`` written as on the Hydra command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def model_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` of every :data:`MODEL_KEYS` setting in which two resolved configs
    differ (a key one of them lacks counts as null)."""
    a, b = model_settings(saved), model_settings(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _raised_in_package(error: BaseException) -> bool:
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """For the command-line entry points: a ValueError, TypeError, FileNotFoundError or FileExistsError raised by
    this package (a bad setting, a missing file) becomes one line ``error: ...`` on stderr and exit code 2. Any other
    exception keeps its traceback, as does every one with ``HYDRA_FULL_ERROR=1``."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _raised_in_package(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def gpu_table(cfg: DictConfig, device: torch.device) -> dict:
    """The batch table of ``cfg.gpu``; ``auto`` picks one by the device found."""
    if cfg.gpu.name != "auto":
        return _plain(cfg.gpu.batch)
    if device.type != "cuda":
        name = "cpu"
    else:
        gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = next((n for n, need in GPU_TABLE_MIN_GB if gb >= need), "a10g_24gb")
    path = importlib.resources.files("wrinklefree.configs") / "gpu" / f"{name}.yaml"
    return _plain(OmegaConf.create(path.read_text()).batch)


def batch_settings(cfg: DictConfig, table: dict) -> tuple[int, int]:
    """``(micro-batch size, gradient-accumulation steps)``: the config's, else (null) the gpu table's."""
    entry = table.get(cfg.model.name, {})
    chosen = entry.get(cfg.training.stage) or entry.get("default") or table.get("default") or {}
    batch = int_setting(cfg, "training.batch_size", 1, f"the gpu={cfg.gpu.name} table's")
    accum = int_setting(cfg, "training.grad_accum", 1, f"the gpu={cfg.gpu.name} table's")
    batch = chosen.get("batch_size", 1) if batch is None else batch
    accum = chosen.get("grad_accum", 1) if accum is None else accum
    if batch < 1 or accum < 1:
        raise ValueError(
            f"gpu={cfg.gpu.name}: the table's batch_size and grad_accum must be >= 1, got {batch} and {accum}"
        )
    return int(batch), int(accum)


def build_tokenizer(cfg: DictConfig):
    """``data.tokenizer``; ``auto``: the pretrained model's, else the built-in BPE (trained and cached on first use)."""
    from wrinklefree.data import get_tokenizer

    name = cfg.data.tokenizer
    if name == "auto":
        name = cfg.model.pretrained
    return get_tokenizer(name, vocab_size=cfg.data.vocab_size)


def build_model(
    cfg: DictConfig, tokenizer, schedule: QuantSchedule | None, *, pretrained_weights: bool = True
) -> nn.Module:
    """The Hugging Face causal LM of ``cfg.model``, converted to BitNet unless ``training.convert`` is false
    (``training.lrc_rank``, when set, replaces ``model.convert.lrc_rank``).

    ``pretrained_weights`` False: for ``model.pretrained``, only its config is read and the weights are
    freshly initialized (for loading a checkpoint over them, without reading the pretrained weights).
    """
    import transformers
    from transformers.activations import ACT2FN

    mcfg = cfg.model
    dtype = getattr(torch, str(mcfg.dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {mcfg.dtype!r}")
    if mcfg.pretrained:
        if pretrained_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(mcfg.pretrained, dtype=dtype)
        else:
            config = transformers.AutoConfig.from_pretrained(mcfg.pretrained)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # e.g. the added mask token
            model.resize_token_embeddings(len(tokenizer))
    else:
        fields = dict(_plain(mcfg.config))
        model_type = fields.pop("model_type")
        if "hidden_act" in fields and fields["hidden_act"] not in ACT2FN:
            raise ValueError(
                f"model.config.hidden_act must be an activation transformers knows (silu, relu2, gelu, ...), "
                f"got {fields['hidden_act']!r}"
            )
        config = transformers.AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **fields,
        )
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cfg.training.convert:
        conv = _plain(mcfg.convert)
        if cfg.training.get("lrc_rank") is not None:
            conv["lrc_rank"] = cfg.training.lrc_rank
        convert(model, schedule=schedule, **conv)
    return model


def freeze_except(model: nn.Module, patterns: list[str]) -> int:
    """Leave ``requires_grad`` on only for the parameters whose name matches one of the ``fnmatch`` patterns
    (``training.trainable``); returns how many parameters stay trainable."""
    import fnmatch

    kept = 0
    for name, p in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(train)
        kept += p.numel() if train else 0
    if kept == 0:
        raise ValueError(f"training.trainable={patterns}: no parameter name matches (e.g. {name!r})")
    return kept


class Trainer:
    """Builds everything from a composed Hydra config and runs the loop (:meth:`fit`).

    ``overrides``: the command-line overrides the config was composed with (Hydra's task overrides), repeated
    in the commands printed at the end; None when unknown (a run started from Python).
    Nothing is written before :meth:`fit`.
    """

    def __init__(self, cfg: DictConfig, *, overrides: Sequence[str] | None = None) -> None:
        from wrinklefree.data import build_loader, sources_from_config

        self.cfg = cfg
        self.overrides = None if overrides is None else list(overrides)
        tcfg = cfg.training
        if "stages" in tcfg:
            raise ValueError(
                f"training={tcfg.stage} is a pipeline of stages, not one run: python -m wrinklefree.pipeline "
                f"training={tcfg.stage}"
            )
        check_settings(cfg)
        self.ctx = distributed.setup(cfg.distributed.strategy, cfg.device, cfg.distributed.get("backend", "auto"))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.max_steps = int(tcfg.max_steps)

        self.tokenizer = build_tokenizer(cfg)

        self.schedule = QuantSchedule(int(tcfg.quant_warmup.steps), tcfg.quant_warmup.kind) if tcfg.convert else None
        model = build_model(cfg, self.tokenizer, self.schedule).to(self.ctx.device)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and int(cfg.data.seq_len) > positions:
            raise ValueError(
                f"data.seq_len={cfg.data.seq_len} is longer than the model's {positions} positions "
                f"(max_position_embeddings): set data.seq_len <= {positions}"
            )
        torch.manual_seed(cfg.seed + self.ctx.rank)  # from here on (e.g. DLM masks) each rank draws its own
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = freeze_except(model, list(tcfg.trainable)) if tcfg.get("trainable") else self.n_params
        if tcfg.activation_checkpointing:
            model.gradient_checkpointing_enable()
        self.raw_model = model
        self.model = distributed.wrap(model, self.ctx, _plain(cfg.distributed))
        self.forward_model = torch.compile(self.model) if tcfg.compile else self.model

        self.batch_size, self.grad_accum = batch_settings(cfg, gpu_table(cfg, self.ctx.device))
        if tcfg.auto_batch_size:
            self._auto_batch_size()
        self.seq_len = int(cfg.data.seq_len)
        self.global_batch = self.batch_size * self.grad_accum * self.ctx.world_size

        try:
            self.optimizer = build_optimizer(self.raw_model, _plain(tcfg.optimizer))
        except ValueError as e:
            raise ValueError(f"training.optimizer: {e}") from e
        self.lr_scheduler = self._build_lr_scheduler(max(self.max_steps, 1))
        self.qk_tracker = None
        qk = tcfg.qk_clip.enabled
        if qk is True or (qk == "auto" and tcfg.optimizer.type == "muon"):
            from wrinklefree.train.muon import MaxLogitTracker

            self.qk_tracker = MaxLogitTracker(self.raw_model)
        self.zclip = (
            ZClip(**{k: v for k, v in _plain(tcfg.zclip).items() if k != "enabled"}) if tcfg.zclip.enabled else None
        )

        self.objectives = self._build_objectives()
        sources = sources_from_config(_plain(cfg.data.sources))
        loader_kw = dict(
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            seed=cfg.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            eval_fraction=float(cfg.data.eval_fraction),
        )
        self.train_loader = build_loader(sources, self.tokenizer, split="train", **loader_kw)
        self.eval_sources = sources
        self.eval_loader_kw = loader_kw
        self.has_eval = float(cfg.data.eval_fraction) > 0
        self._warned_no_eval = False

        config_dict = _plain(cfg)
        self.run_name = cfg.experiment or run_name(
            cfg.model.name, tcfg.stage, tcfg.optimizer.type, float(tcfg.optimizer.lr), self.global_batch, config_dict
        )
        # A named experiment is a chain of stages (DESIGN.md section 5): each stage logs in a folder of its
        # own, as it checkpoints in one; a generated name already holds the stage.
        self.run_dir = Path(cfg.output_dir) / "runs" / self.run_name
        self.log_name = self.run_name
        if cfg.experiment:
            self.run_dir = self.run_dir / tcfg.stage
            self.log_name = f"{self.run_name}-{tcfg.stage}"
        self.config_dict = config_dict
        self.checkpoints = CheckpointManager(
            stage_dir(cfg.output_dir, self.run_name, tcfg.stage), keep=int(tcfg.keep_checkpoints)
        )
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: Path | str | None = None
        self.logger = None  # opened by fit(), which writes config.yaml first
        # ---- checkpoint discovery and remote mirror (training.init_from / remote_dir / hub_repo) ----
        self._setup_checkpoints()
        # ---- end of checkpoint discovery ----
        self._maybe_resume()
        data_from = tcfg.get("data_from")
        if self.step == 0 and data_from:
            if str(data_from) != "init":
                self._continue_data(str(data_from))
            elif self._init_source is not None:
                self._continue_data(self._init_source)
            else:
                self._print("training.data_from=init: the weights come from no checkpoint; the data starts at 0")
        # a fresh run only: the probe draws from the RNG (DLM masks), which a resumed run must not. Not under
        # FSDP2, where backward passes of single objectives outside the step crashed the CPU (gloo) ranks.
        self._probe_pending = (
            bool(tcfg.get("objective_grad_norms", True)) and self.step == 0 and self.ctx.strategy != "fsdp"
        )

    # ---- setup helpers ----------------------------------------------------------------------

    def _build_objectives(self) -> ObjectiveManager:
        ocfg = _plain(self.cfg.training.objectives)
        unknown = set(ocfg) - set(OBJECTIVES)
        if unknown:
            raise ValueError(
                f"training.objectives: unknown objectives {sorted(unknown)}; available: {', '.join(OBJECTIVES)}"
            )
        curriculum = _plain(self.cfg.training.curriculum) or []
        weights = {name: float(ocfg[name].get("weight", 0.0)) for name in ocfg}
        used = {name for name, w in weights.items() if w} | {
            name for phase in curriculum for name, w in phase.get("weights", {}).items() if w
        }
        objectives: dict[str, nn.Module] = {}
        if used & set(DISTILLATION):  # CE comes from the same student forward pass as the distillation
            kd, ad, hidden = ocfg.get("logits_kd", {}), ocfg.get("attention_kd", {}), ocfg.get("hidden", {})
            objectives["distill"] = Distillation(
                self._load_teacher(),
                self.raw_model,
                temperature=float(kd.get("temperature", 5.0)),
                relation_layer=int(ad.get("layer", -1)) if "attention_kd" in used else None,
                relation_heads=int(ad.get("relation_heads", 32)),
                hidden_loss=str(hidden.get("loss", "cosine")),
            )
        else:
            objectives["ce"] = CrossEntropy()
            weights = {k: v for k, v in weights.items() if k not in DISTILLATION}
        weights.setdefault("ce", 1.0)
        if "dlm" in ocfg:
            d = dict(ocfg["dlm"])
            weights["dlm"] = float(d.pop("weight", 0.0))
            tok = self.tokenizer
            if tok.mask_token_id is None:
                raise ValueError("the DLM objective needs a tokenizer with a mask token")
            never = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None]
            objectives["dlm"] = DiffusionLM(tok.mask_token_id, never_mask=never, **d)
        return ObjectiveManager(objectives, weights, curriculum, self.max_steps).to(self.ctx.device)

    def _load_teacher(self) -> nn.Module:
        """The frozen teacher of the distillation objectives (:mod:`wrinklefree.train.teacher`), in the
        student's dtype on this rank's device; sharded like the student under FSDP2."""
        from wrinklefree.train.teacher import load_teacher

        spec = self.cfg.training.get("teacher") or self.cfg.model.pretrained
        if not spec:
            raise ValueError(
                f"training={self.cfg.training.stage}: the distillation objectives need a teacher; set "
                "training.teacher (a hub id, transformers directory or trainer checkpoint) or model.pretrained"
            )
        dtype = next(self.raw_model.parameters()).dtype
        teacher = load_teacher(str(spec), dtype=dtype, device=self.ctx.device)
        n = sum(p.numel() for p in teacher.parameters())
        self._print(f"teacher: {spec} ({n / 1e6:.2f}M parameters, frozen, {str(dtype).removeprefix('torch.')})")
        if self.ctx.strategy == "fsdp":  # a frozen replica per rank under DDP; FSDP2 shards it too
            teacher = distributed.wrap(teacher, self.ctx, _plain(self.cfg.distributed))
        self.teacher = teacher
        return teacher

    def _auto_batch_size(self) -> None:
        if self.ctx.device.type != "cuda":
            self._print("training.auto_batch_size needs a GPU; keeping the table's batch size")
            return
        global_micro = self.batch_size * self.grad_accum
        size, best = 1, None
        while size <= global_micro:
            try:
                ids = torch.randint(0, len(self.tokenizer), (size, int(self.cfg.data.seq_len)), device=self.ctx.device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = self.model(input_ids=ids, labels=ids).loss
                loss.backward()
                self.model.zero_grad(set_to_none=True)
                best = size
                size *= 2
            except torch.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        if best is None:
            raise RuntimeError("training.auto_batch_size: not even one sequence fits on this GPU")
        self.batch_size = best
        self.grad_accum = max(1, math.ceil(global_micro / best))
        self._print(f"auto batch size: {self.batch_size} x {self.grad_accum} accumulation steps")

    def _setup_checkpoints(self) -> None:
        """Mirror checkpoints to ``training.remote_dir`` and load ``training.init_from``'s weights (DESIGN.md
        section 5). Here, after wrapping and before resume: see :func:`wrinklefree.train.discovery.setup_checkpoints`.
        """
        from wrinklefree.train.discovery import setup_checkpoints

        self._init_source = setup_checkpoints(
            self.cfg, self.checkpoints, self.raw_model, self.run_name, log=self._print
        )

    def _build_lr_scheduler(self, steps: int):
        self.lr_horizon = steps  # the steps the schedule spans (for the warning of a warm-up longer than that)
        try:
            return build_lr_scheduler(self.optimizer, _plain(self.cfg.training.lr_schedule), steps)
        except ValueError as e:
            raise ValueError(f"training.lr_schedule: {e}") from e

    def _maybe_resume(self) -> None:
        rcfg = self.cfg.training.resume
        path = rcfg.checkpoint_path
        if not path:
            return
        if path == "latest":
            found = self.checkpoints.latest()
            if found is None:
                self._print(f"resume=latest: no checkpoint in {self.checkpoints.directory}; starting fresh")
                return
            path = found
        self._check_resumed_model(path)
        state = CheckpointManager.load(path, self.raw_model, self.optimizer if rcfg.load_optimizer_state else None)
        self.resumed_from = path
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if rcfg.load_scheduler_state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:  # a new schedule from step 0 for the steps still to run
            self.lr_scheduler = self._build_lr_scheduler(max(self.max_steps - self.step, 1))
        if self.schedule is not None and state.get("quant_schedule"):
            self.schedule.load_state_dict(state["quant_schedule"])
        if state.get("data") is not None:
            self.train_loader.load_state_dict(state["data"])
        if self.zclip is not None and state.get("zclip"):
            self.zclip.load_state_dict(state["zclip"])
        self._print(f"resumed from {path} at step {self.step}")

    def _check_resumed_model(self, path: Path | str) -> None:
        """Refuse to resume ``path`` into a model built from other settings than the ones it was trained with
        (:data:`MODEL_KEYS`): its weights would load into the wrong model, silently when the shapes agree."""
        try:
            saved = read_trainer_state(path).get("config")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"training.resume.checkpoint_path: {e}") from e
        if saved is None:  # an older trainer's checkpoint: nothing to compare with
            self._print(f"{path} does not record its config; resuming without checking the model settings")
            return
        diffs = model_differences(saved, self.config_dict)
        if not diffs:
            return
        listed = "; ".join(
            f"{k}: {override_value(a)} in the checkpoint, {override_value(b)} in this run" for k, a, b in diffs
        )
        fix = " ".join(shlex.quote(f"{k}={override_value(a)}") for k, a, _ in diffs)
        raise ValueError(
            f"training.resume.checkpoint_path={path}: the checkpoint was trained with other model settings "
            f"({listed}). Resume with the settings it was trained with ({fix}), or start a new run "
            "(another experiment= or output_dir=)"
        )

    def _continue_data(self, path: str) -> None:
        """Start the training data where the checkpoint ``path``'s run stopped (``training.data_from``)."""
        try:
            state = read_trainer_state(path).get("data")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"training.data_from: no complete checkpoint at {path} ({e})") from e
        if state is None:
            raise ValueError(f"training.data_from: the checkpoint {path} holds no data position")
        try:
            self.train_loader.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"training.data_from={path}: its data position does not fit this data config: {e}") from e
        self._print(f"data: continuing after {path} (its run read {state['step']} batches)")

    # ---- the loop ---------------------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.ctx.is_main:
            print(f"[wrinklefree] {msg}", file=sys.stderr, flush=True)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self.train_loader)
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.ctx.device)
        probe: dict[str, float] = {}
        for micro in range(self.grad_accum):
            batch = self._next_batch()
            if micro == 0 and self._probe_pending:
                self._probe_pending = False
                probe = self._objective_grad_norms(batch)
            sync = micro == self.grad_accum - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
                self.model.set_requires_gradient_sync(sync)
            no_sync = getattr(self.model, "no_sync", None)  # DDP
            ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    loss, parts = self.objectives(self.forward_model, batch, self.step)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.zclip is not None:
            grad_norm = self.zclip.step(params)
        elif self.cfg.training.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(self.cfg.training.grad_clip))
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.qk_tracker is not None:  # MuonClip: bring each head's max attention logit to tau
            from wrinklefree.train.muon import qk_clip

            qk_clip(self.raw_model, self.qk_tracker.pop(), tau=float(self.cfg.training.qk_clip.tau))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.schedule is not None:
            self.schedule.step()
        self.step += 1
        self.tokens_seen += self.global_batch * self.seq_len
        # Device tensors: reading them waits for the GPU, so that happens on logged steps only (log_metrics).
        metrics: dict[str, Any] = {"loss": loss_sum / self.grad_accum}
        for k, v in totals.items():
            metrics[f"loss_{k}"] = v / self.grad_accum
        metrics["grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics.update({f"grad_norm_{name}": value for name, value in probe.items()})
        metrics["lr"] = lr
        if self.schedule is not None:
            metrics["lam"] = float(self.schedule.lam)  # a CPU tensor: no device sync
        return metrics

    def _objective_grad_norms(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The gradient norm of each weighted objective alone on ``batch`` (one forward and backward each, over
        all ranks), printed, for calibrating the weights (DESIGN.md section 5: comparable gradients). The
        gradients are cleared after; the step itself is unchanged."""
        weights = {n: w for n, w in self.objectives.weights_at(self.step).items() if w != 0.0}
        if len(weights) < 2:
            return {}
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # DDP would reduce the gradients, and fail on the parameters a lone objective leaves unused: under DDP
        # the norms are this rank's.
        model = self.raw_model if self.ctx.strategy == "ddp" else self.forward_model
        norms = {}
        for name, w in weights.items():
            with self._autocast():
                loss = w * self.objectives.losses(model, batch, [name])[name]
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.zero_grad(set_to_none=True)
        total = sum(norms.values()) or 1.0
        shares = ", ".join(f"{n} {v:.3g} ({100 * v / total:.0f}%)" for n, v in norms.items())
        self._print(f"gradient norm of each weighted objective at step {self.step + 1}: {shares}")
        return norms

    @staticmethod
    def log_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` with its device tensors averaged over ranks (one all-reduce) and read as floats."""
        keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        values = distributed.all_reduce_mean(torch.stack([metrics[k].detach().float() for k in keys])).tolist()
        return {**metrics, **dict(zip(keys, values, strict=True))}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """CE on the held-out documents (``training.eval_batches`` batches), averaged over ranks; None (with a
        warning, once) when the held-out split holds no full sequence."""
        from wrinklefree.data import build_loader

        self.model.eval()
        loader = build_loader(self.eval_sources, self.tokenizer, split="eval", **self.eval_loader_kw)
        ce = CrossEntropy()
        losses = []
        for _ in range(int(self.cfg.training.eval_batches)):
            try:
                batch = next(loader)
            except StopIteration:
                break
            batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
            with self._autocast():
                losses.append(ce(self.forward_model, batch).float())
        if not losses:  # the same on every rank: the held-out split is the same documents everywhere
            if not self._warned_no_eval:
                self._print(
                    "warning: the held-out split holds no sequence of data.seq_len tokens (data.eval_fraction "
                    "sets aside every Nth document): no eval loss; use more documents, or data.eval_fraction=0"
                )
                self._warned_no_eval = True
            return None
        return distributed.all_reduce_mean(torch.stack(losses).mean()).item()

    def save(self, name: str) -> Path:
        """Checkpoint ``name``: weights, optimizer and trainer state, plus what makes it self-describing for
        ``python -m wrinklefree.export``: the resolved config (to rebuild the model) and the tokenizer (in
        ``tokenizer/``, written by rank 0 as part of the same atomic save)."""
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "quant_schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "data": self.train_loader.state_dict(),
            "zclip": self.zclip.state_dict() if self.zclip is not None else None,
            "run_name": self.run_name,
            "config": _plain(self.cfg),
        }
        return self.checkpoints.save(name, self.raw_model, self.optimizer, state, extra_files=self._write_tokenizer)

    def _write_tokenizer(self, checkpoint: Path) -> None:
        self.tokenizer.save_pretrained(checkpoint / TOKENIZER_DIR)

    def _claim_run_dir(self) -> None:
        """A fresh run refuses a stage directory that holds checkpoints already (an earlier run's, which its
        saves would replace) unless ``overwrite=true``, which removes them first. A resumed run continues there.
        """
        if self.resumed_from is not None:
            return

        def claim() -> None:
            existing = [path for _, path in self.checkpoints.steps()]
            final = self.checkpoints.find("final")
            existing += [final] if final is not None else []
            if not existing:
                return
            names = ", ".join(sorted(p.name for p in existing))
            if not self.cfg.get("overwrite"):
                raise FileExistsError(
                    f"{self.checkpoints.directory} holds the checkpoints of an earlier run ({names}) that this new "
                    f"run would replace. Continue that run with training.resume.checkpoint_path=latest (or a "
                    f"checkpoint's path), name a new run with experiment=NAME or output_dir=DIR, or replace it "
                    f"with overwrite=true"
                )
            for path in existing:
                shutil.rmtree(path)
            self._print(
                f"overwrite=true: removed the earlier run's checkpoints ({names}) in {self.checkpoints.directory}"
            )

        on_rank0(claim, "the check of the checkpoint directory")

    def _open_run(self) -> None:
        """Write ``config.yaml`` and open the metrics file (appended to by a resumed run) and W&B: rank 0."""
        if not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.logger = MetricsLogger(
            self.run_dir,
            wandb_cfg=_plain(self.cfg.training.logging.wandb),
            run_config=self.config_dict,
            name=self.log_name,
            append=self.resumed_from is not None,
        )

    def _warn_short_run(self) -> None:
        """Say what a run shorter than its warm-ups means: not fully ternary at the end (so not exportable),
        or a learning rate that never reaches its peak."""
        tcfg = self.cfg.training
        if self.max_steps == 0:  # conversion only (stage 1): the next stage warms up
            return
        if self.schedule is not None and self.schedule.kind != "constant":
            lam = self.schedule.lam_at(self.max_steps)
            if lam < 1.0:
                self._print(
                    f"warning: training.max_steps={self.max_steps} is shorter than the quantization warm-up "
                    f"(training.quant_warmup.steps={tcfg.quant_warmup.steps}): the run ends at lam {lam:.2f}, not "
                    "fully ternary, and its checkpoint cannot be exported to GGUF until a resumed run completes the "
                    "warm-up. Raise training.max_steps or lower training.quant_warmup.steps"
                )
        warmup = int(tcfg.lr_schedule.warmup_steps)
        if warmup > self.lr_horizon:
            self._print(
                f"warning: the learning-rate warm-up (training.lr_schedule.warmup_steps={warmup}) is longer than "
                f"the {self.lr_horizon} steps of the schedule (training.max_steps={self.max_steps}): the learning "
                f"rate never reaches training.optimizer.lr ({self.lr_horizon / warmup:.0%} of it at the end) and "
                "never decays. Lower training.lr_schedule.warmup_steps or raise training.max_steps"
            )

    def fit(self) -> dict[str, Any]:
        """Train to ``training.max_steps``; returns a summary (first/last loss, eval loss, paths)."""
        tcfg = self.cfg.training
        self._claim_run_dir()
        self._open_run()
        trained = "" if self.n_trainable == self.n_params else f" ({self.n_trainable / 1e6:.2f}M trained)"
        self._print(
            f"run {self.run_name}: {self.n_params / 1e6:.2f}M parameters{trained}, {self.ctx.world_size} x "
            f"{self.ctx.device}, "
            f"batch {self.batch_size} x {self.grad_accum} accum x {self.ctx.world_size} ranks x {self.seq_len} tokens"
        )
        self._warn_short_run()
        first_loss = None
        recent: list[tuple[int, float]] = []  # (step, headline loss) of the last logged steps: a smoothed final figure
        first_step = None
        loss_name = "loss"  # the headline: CE when it is trained, else the one objective, else the total
        fit_start = time.perf_counter()
        eval_loss = None
        bar = None
        if self.ctx.is_main and self.max_steps > self.step:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)  # fmt: skip
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                step_time = time.perf_counter() - t0
                window_tokens += self.global_batch * self.seq_len
                if bar is not None:
                    bar.update(1)
                if self.step == 1 or self.step % tcfg.log_every == 0 or self.step == self.max_steps:
                    metrics = self.log_metrics(metrics)
                    if not math.isfinite(metrics["loss"]):
                        raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}")
                    parts = [k.removeprefix("loss_") for k in metrics if k.startswith("loss_")]
                    loss_name = "ce" if "ce" in parts else parts[0] if len(parts) == 1 else "loss"
                    headline = metrics[f"loss_{loss_name}" if loss_name != "loss" else "loss"]
                    if first_loss is None:
                        first_loss, first_step = headline, self.step
                    recent = (recent + [(self.step, headline)])[-10:]
                    tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    if bar is not None:
                        bar.set_postfix(loss=f"{headline:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    metrics.update(tokens_per_s=tok_s, step_time=step_time, tokens=self.tokens_seen)
                    if self.has_eval and tcfg.eval_every and self.step % tcfg.eval_every == 0:
                        eval_loss = self.evaluate()
                        if eval_loss is not None:
                            metrics["eval_loss"] = eval_loss
                    if self.logger is not None:
                        self.logger.log(self.step, metrics)
                    window_tokens, window_start = 0, time.perf_counter()
                if tcfg.save_every and self.step % tcfg.save_every == 0 and self.step < self.max_steps:
                    self.save(f"step_{self.step}")
            if self.has_eval and eval_loss is None and self.max_steps > 0:
                eval_loss = self.evaluate()
            final = self.save("final")
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
        last = [r for r in recent if r[0] != first_step] or recent  # the first figure only when it is the only one
        summary = {
            "run_name": self.run_name,
            "stage": tcfg.stage,
            "steps": self.step,
            "tokens": self.tokens_seen,
            "seconds": time.perf_counter() - fit_start,
            "loss_name": loss_name,
            "first_loss": first_loss,
            "first_loss_step": first_step,
            "last_loss": sum(loss for _, loss in last) / len(last) if last else None,
            "last_loss_steps": [step for step, _ in last],
            "eval_loss": eval_loss,
            "checkpoint": str(final),
            "run_dir": str(self.run_dir),
        }
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self._print_summary(summary)
        return summary

    def _print_summary(self, s: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        name = "CE" if s["loss_name"] == "ce" else f"{s['loss_name']} loss"
        if s["first_loss"] is None:
            losses = "no steps"
        else:
            steps = s["last_loss_steps"]
            n = len(steps)
            last = f"step {steps[0]}" if n == 1 else f"mean of {n} logged steps, {steps[0]}-{steps[-1]}"
            first = f"{s['first_loss']:.3f} (step {s['first_loss_step']})"
            losses = f"train {name} {first} -> {s['last_loss']:.3f} ({last})"
        ev = f", eval loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else ""
        export = ""
        if self.schedule is not None:
            lam = float(self.schedule.lam)
            blocker = bitnet_blocker(self.raw_model)
            if blocker is not None:
                export = f"  export to GGUF: not available for this model: {blocker}\n"
            elif lam >= 1.0:  # ternary, warm-up done: exportable
                export = f"  export to GGUF: python -m wrinklefree.export {s['checkpoint']} --outfile model.gguf\n"
            else:
                export = (
                    f"  export to GGUF: not yet: the quantization warm-up is at lam {lam:.2f} "
                    f"(training.quant_warmup.steps={self.cfg.training.quant_warmup.steps}); train longer first\n"
                )
        print(
            f"\nDone: {s['steps']} steps, {losses}{ev}.\n"
            f"  checkpoint: {s['checkpoint']}\n"
            f"  metrics:    {s['run_dir']}/metrics.jsonl\n\n"
            "Next steps:\n"
            f"  train longer:   {self.resume_command(s['checkpoint'], 2 * max(s['steps'], 1))}\n"
            f"{export}"
            "  another recipe: python -m wrinklefree.train training=stage2_pretrain model=smollm2_135m data=fineweb\n"
            "  on N GPUs:      torchrun --nproc_per_node=N -m wrinklefree.train distributed=fsdp_multi\n"
            "  kernels:        python bench/run.py\n",
            flush=True,
        )

    def resume_command(self, checkpoint: str | os.PathLike, max_steps: int) -> str:
        """The command that continues this run from ``checkpoint`` to ``max_steps``: the run's own command-line
        overrides (so that it builds the same model and reads the same data), then the run name, checkpoint
        and step count."""
        launcher = "python -m wrinklefree.train"
        if self.ctx.world_size > 1:
            launcher = f"torchrun --nproc_per_node={self.ctx.world_size} -m wrinklefree.train"
        own = [o for o in self.overrides or () if o.lstrip("+~").split("=", 1)[0] not in NEXT_RUN_KEYS]
        args = [
            *own,
            f"experiment={self.run_name}",
            f"training.resume.checkpoint_path={checkpoint}",
            f"training.max_steps={max_steps}",
        ]
        command = " ".join([launcher, *(shlex.quote(a) for a in args)])
        if self.overrides is None:  # started from Python: its settings are not known as overrides
            command += " (with the overrides this run's config was composed with; see its config.yaml)"
        return command

    def close(self, clean: bool = True) -> None:
        """Release the process group; ``clean=False`` after an error (see :func:`distributed.teardown`).

        The DDP wrapper goes first: its reducer holds the process group, and destroying the group
        under it leaves the reducer's destructor, run whenever the trainer is collected, joining
        gloo threads that wait for a peer which has already exited.
        """
        self.model = self.raw_model
        gc.collect()
        distributed.teardown(clean)
