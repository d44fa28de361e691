"""`python -m wrinklefree.train`: config tree, loop, checkpoints, resume, logging (tiny runs on CPU)."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402

from wrinklefree.nn import BitLinear  # noqa: E402
from wrinklefree.train.metrics import MetricsLogger  # noqa: E402
from wrinklefree.train.trainer import Trainer, batch_settings, cli_errors, int_setting  # noqa: E402

TINY = [
    "model.config.hidden_size=64",
    "model.config.intermediate_size=128",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.config.max_position_embeddings=64",
    "data.seq_len=32",
    "data.vocab_size=300",
    "data.sources.0.max_chars=300000",
    "training.batch_size=2",
    "training.grad_accum=2",
    "training.log_every=1",
    "training.eval_batches=2",
    "training.logging.wandb.enabled=false",
]


def config(out: Path, *overrides: str):
    tiny = TINY
    if any(o.startswith("data=") for o in overrides):  # another data group has no builtin source to cap
        tiny = [o for o in TINY if not o.startswith("data.sources.0.max_chars=")]
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        return compose("config", overrides=[f"output_dir={out}", *tiny, *overrides])


def run(out: Path, *overrides: str) -> tuple[Trainer, dict]:
    trainer = Trainer(config(out, *overrides))
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(out: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """``python -m wrinklefree.train`` (under torchrun for nproc > 1), one kernel thread per process."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "wrinklefree.train", f"output_dir={out}", *overrides]
    env = {**os.environ, "WF_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def one_and_two_ranks(tmp_path: Path, common: list[str], strategy: str) -> list[str]:
    """The same run on one rank taking 4 sequences a step (in ``tmp_path/one``) and on two ranks taking 1
    each in each of 2 accumulated micro-batches (``tmp_path/two``), both finished; returns the 2-rank run's
    overrides (for resuming it)."""
    one = cli(tmp_path / "one", *common, "training.batch_size=4", "training.grad_accum=1")
    assert one.returncode == 0, one.stderr[-3000:]
    two_ranks = [*common, "training.batch_size=1", "training.grad_accum=2", f"distributed={strategy}"]
    two = cli(tmp_path / "two", *two_ranks, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return two_ranks


def test_default_config_composes_with_the_embedded_recipe():
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        cfg = compose("config")
    assert cfg.model.name == "tiny" and cfg.training.stage == "unified" and cfg.data.name == "builtin"
    assert cfg.distributed.strategy == "single" and cfg.gpu.name == "auto"
    assert cfg.training.objectives.dlm.weight > 0 and cfg.model.convert.subln == "standard"


@pytest.mark.parametrize(
    "group",
    [
        "model=smollm2_135m",
        "model=qwen3_4b",
        "model=bitnet_2b4t",
        "training=stage2_pretrain",
        "training=fp_pretrain",
        "training=stage3_distill",
        "training=stage1_9_layerwise",
        "training=lrc_calibration",
        "training=direct_ternary",
        "training=fp_continue",
        "data=fineweb",
        "data=mixed_pretrain",
        "distributed=fsdp_multi",
        "distributed=ddp",
        "gpu=h100_80gb",
        "gpu=a10g_24gb",
    ],
)
def test_every_group_option_composes(group):
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        cfg = compose("config", overrides=[group])
    assert cfg.training.max_steps >= 0


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigCompositionException, match="training.bogus"):
        config(Path("/tmp"), "training.bogus=1")
    with pytest.raises(ConfigCompositionException):
        config(Path("/tmp"), "model=gpt5")


def test_unified_run_logs_metrics_saves_and_lowers_the_loss(tmp_path):
    trainer, summary = run(tmp_path, "training.max_steps=12", "training.eval_every=6", "training.save_every=6")
    assert isinstance(trainer.raw_model.model.layers[0].mlp.down_proj, BitLinear)
    rows = metrics(summary["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "lr", "tokens_per_s", "step_time", "loss_ce", "lam", "grad_norm"):
        assert all(key in r for r in rows), key
    assert "loss_dlm" in rows[-1] and "loss_dlm" not in rows[0]  # the curriculum turns DLM on at 25%
    assert rows[5]["eval_loss"] > 0 and rows[-1]["eval_loss"] > 0
    assert rows[-1]["lam"] == pytest.approx(12 / 60)
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["first_loss_step"] == 1 and summary["last_loss_steps"] == list(range(3, 13))
    final = Path(summary["checkpoint"])
    assert final.name == "final" and (final / ".metadata").is_file()
    assert final.parent == tmp_path / "checkpoints" / summary["run_name"] / "unified_checkpoint" / "checkpoints"
    assert (final.parent / "step_6").is_dir()
    assert summary["run_name"].startswith("tiny-unified-adamw-lr0.003-b4-")


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, optimizer):
    common = ["training.max_steps=8", "training.save_every=4", "training.eval_every=0", "experiment=resume-test",
              f"training.optimizer.type={optimizer}"]  # fmt: skip
    _, full = run(tmp_path / "a", *common)
    step4 = Path(full["checkpoint"]).parent / "step_4"
    _, resumed = run(tmp_path / "b", *common, f"training.resume.checkpoint_path={step4}")
    a = {r["step"]: r["loss"] for r in metrics(full["run_dir"])}
    b = {r["step"]: r["loss"] for r in metrics(resumed["run_dir"])}
    assert sorted(b) == [5, 6, 7, 8]
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]


def test_resume_can_drop_optimizer_and_scheduler_state(tmp_path):
    common = ["training.max_steps=4", "training.save_every=2", "training.eval_every=0", "experiment=fresh-opt"]
    _, full = run(tmp_path / "a", *common)
    step2 = Path(full["checkpoint"]).parent / "step_2"
    trainer = Trainer(
        config(
            tmp_path / "b",
            *common,
            f"training.resume.checkpoint_path={step2}",
            "training.resume.load_optimizer_state=false",
            "training.resume.load_scheduler_state=false",
        )
    )
    try:
        assert trainer.step == 2 and not trainer.optimizer.state  # weights restored, fresh optimizer
        assert trainer.lr_scheduler.last_epoch == 0
    finally:
        trainer.close()


def test_fp_pretrain_trains_plain_linear_layers(tmp_path):
    trainer, summary = run(tmp_path, "training=fp_pretrain", "training.max_steps=2", "training.eval_every=0")
    assert not any(isinstance(m, BitLinear) for m in trainer.raw_model.modules())
    assert "lam" not in metrics(summary["run_dir"])[-1]


def test_stage1_subln_converts_and_saves_without_training(tmp_path):
    trainer, summary = run(tmp_path, "training=stage1_subln")
    assert summary["steps"] == 0 and Path(summary["checkpoint"]).name == "final"
    assert trainer.raw_model.model.layers[0].self_attn.o_proj.subln is not None


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    common = ["training.max_steps=2", "training.eval_every=0", "training.objectives.dlm.weight=0", "experiment=ac"]
    _, plain = run(tmp_path / "a", *common)
    trainer, ckpt = run(tmp_path / "b", *common, "training.activation_checkpointing=true")
    assert trainer.raw_model.is_activation_checkpointing
    a, b = metrics(plain["run_dir"]), metrics(ckpt["run_dir"])
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer, summary = run(
        tmp_path, "training.max_steps=2", "training.eval_every=0", "training.logging.wandb.enabled=true"
    )
    runs = list((Path(summary["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and trainer.logger.wandb_mode == "offline"
    assert len(metrics(summary["run_dir"])) == 2  # the metrics file is written whatever else logs


def test_a_pipeline_recipe_is_not_one_run(tmp_path):
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "training=bitdistill_full"])
    with pytest.raises(ValueError, match="python -m wrinklefree.pipeline training=bitdistill_full"):
        Trainer(cfg)


def test_pipeline_cli_composes_its_recipes(tmp_path):
    cmd = [sys.executable, "-m", "wrinklefree.pipeline", "training=bitdistill_tiny", "--cfg", "job"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage: bitdistill_tiny" in proc.stdout and "direct_ternary:" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp_multi", "ddp"])
def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path, strategy):
    # CE only: the DLM masks are drawn per rank, so only CE is the same computation on both layouts.
    # One rank takes 4 sequences a step; two ranks take 1 each in each of 2 accumulated micro-batches.
    common = [
        *TINY,
        "training.max_steps=4",
        "training.eval_every=0",
        "training.save_every=2",
        "training.objectives.dlm.weight=0",
        "training.curriculum=[]",
        "experiment=ranks",
    ]
    two_ranks = one_and_two_ranks(tmp_path, common, strategy)
    a = metrics(tmp_path / "one" / "runs" / "ranks" / "unified")
    b = metrics(tmp_path / "two" / "runs" / "ranks" / "unified")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-4)
    # every rank took part in the save, and the 2-rank checkpoint resumes
    ckpt = tmp_path / "two" / "checkpoints" / "ranks" / "unified_checkpoint" / "checkpoints"
    assert (ckpt / "step_2" / "trainer_rank1.pt").is_file()
    resumed = cli(tmp_path / "three", *two_ranks, f"training.resume.checkpoint_path={ckpt / 'step_2'}", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = metrics(tmp_path / "three" / "runs" / "ranks" / "unified")
    assert [r["step"] for r in c] == [3, 4]
    for rc, rb in zip(c, b[2:], strict=True):
        assert rc["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-5)
    assert torch.distributed.is_available()


def test_muon_with_qk_clip_and_zclip_train_through_the_trainer(tmp_path):
    trainer, summary = run(
        tmp_path,
        "training.max_steps=3",
        "training.eval_every=0",
        "training.optimizer.type=muon",
        "training.optimizer.lr=0.02",
        "training.zclip.enabled=true",
        "training.qk_clip.tau=1.0",  # low enough that every head gets clipped
    )
    assert type(trainer.optimizer).__name__ == "MuonAdamW" and trainer.qk_tracker is not None
    assert trainer.zclip is not None
    rows = metrics(summary["run_dir"])
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert summary["run_name"].startswith("tiny-unified-muon-lr0.02-")


# ---- the command printed at the end, start-up checks, the run directory, warnings, W&B mode ----------


def train_longer(stdout: str) -> list[str]:
    """The arguments of the "train longer" command a run printed (after ``python -m wrinklefree.train``)."""
    line = re.search(r"train longer: +(.*)", stdout).group(1)
    args = shlex.split(line)
    assert args[:3] == ["python", "-m", "wrinklefree.train"], line
    return args[3:]


def run_args(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WF_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wrinklefree.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_train_longer_repeats_the_runs_overrides_and_resume_checks_the_model(tmp_path):
    silu = ["model.config.hidden_act=silu", "model.convert.activation=keep"]
    once = ["training.max_steps=2", "training.eval_every=0", "experiment=silu", "overwrite=true"]
    first = cli(tmp_path, *TINY, *silu, *once)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"train CE [\d.]+ \(step 1\) -> [\d.]+ \(step 2\)", first.stdout), first.stdout[-2000:]
    args = train_longer(first.stdout)
    assert "overwrite=true" not in args  # a resumed run ignores it
    final = tmp_path / "checkpoints" / "silu" / "unified_checkpoint" / "checkpoints" / "final"
    assert args[0] == f"output_dir={tmp_path}" and args[1 : 1 + len(TINY)] == TINY
    assert [a for a in args if a.startswith(("model.config.hidden_act=", "model.convert.activation="))] == silu
    assert args[-3:] == ["experiment=silu", f"training.resume.checkpoint_path={final}", "training.max_steps=4"]
    assert "training.max_steps=2" not in args  # the run's own step count is replaced, not repeated

    # the printed command continues the run with the model it trained
    config_yaml = tmp_path / "runs" / "silu" / "unified" / "config.yaml"
    resumed = run_args(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "hidden_act: silu" in config_yaml.read_text()
    assert [r["step"] for r in metrics(tmp_path / "runs" / "silu" / "unified")] == [1, 2, 3, 4]

    # without the model overrides, the resume is refused before anything is written, naming what differs
    before = config_yaml.read_text(), (final / ".metadata").stat().st_mtime_ns
    bare = [a for a in args if a not in silu]
    refused = run_args([*bare[:-1], "training.max_steps=6"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "model.config.hidden_act: silu in the checkpoint, relu2 in this run" in line
    assert "model.convert.activation: keep in the checkpoint, relu2 in this run" in line
    assert "model.config.hidden_act=silu model.convert.activation=keep" in line
    assert (config_yaml.read_text(), (final / ".metadata").stat().st_mtime_ns) == before


def test_resume_refuses_another_model_config_from_python(tmp_path):
    common = ["training.max_steps=1", "training.eval_every=0", "experiment=m"]
    _, summary = run(tmp_path, *common, "model.config.hidden_act=silu")
    with pytest.raises(ValueError, match=r"model.config.hidden_act: silu in the checkpoint, relu2 in this run"):
        Trainer(config(tmp_path, *common, f"training.resume.checkpoint_path={summary['checkpoint']}"))
    with pytest.raises(FileNotFoundError, match="training.resume.checkpoint_path: .*nowhere"):
        Trainer(config(tmp_path / "b", *common, f"training.resume.checkpoint_path={tmp_path / 'nowhere'}"))
    # a run started from Python does not know its overrides, and says so in the command it prints
    trainer = Trainer(config(tmp_path / "c", *common))
    try:
        command = trainer.resume_command("CKPT", 2)
    finally:
        trainer.close()
    assert "training.resume.checkpoint_path=CKPT training.max_steps=2" in command and "config.yaml" in command


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=-5", "training.max_steps must be an integer >= 0, got -5"),
        ("training.max_steps=abc", "training.max_steps must be an integer >= 0, got 'abc'"),
        ("training.batch_size=0", r"training.batch_size must be an integer >= 1 or null \(the gpu=auto table's\)"),
        ("training.grad_accum=0", "training.grad_accum must be an integer >= 1 or null"),
        ("training.optimizer.lr=-1", "training.optimizer.lr must be a number >= 0, got -1"),
        ("training.log_every=0", "training.log_every must be an integer >= 1, got 0"),
        ("training.optimizer.type=sgd", "training.optimizer: unknown optimizer type 'sgd'"),
        ("data=local", r"data.paths has no default: set it on the command line \(data.paths=...\)"),
        ("data.seq_len=abc", "data.seq_len must be an integer >= 1, got 'abc'"),
        ("data.eval_fraction=0.7", r"data.eval_fraction must be a number in \[0, 0.5\], got 0.7"),
        ("data.seq_len=4096", r"data.seq_len=4096 is longer than the model's 64 positions"),
        ("model.dtype=bogus", "model.dtype must be float32, bfloat16 or float16, got 'bogus'"),
        ("model.dtype=float16", "model.dtype=float16: float16 weights trained without loss scaling overflow"),
        ("model.config.hidden_act=bogus", "model.config.hidden_act must be an activation transformers knows"),
        ("model.convert.qsparse={ratio:abc}", "QSparse: ratio must be a number, got 'abc'"),
    ],
)
def test_bad_settings_are_errors_naming_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        Trainer(config(tmp_path, override))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_an_empty_held_out_split_warns_and_reports_no_eval_loss(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single short document, so nothing is held out " * 20)
    trainer, summary = run(tmp_path, "data=local", f"data.paths=[{tmp_path / 'one.txt'}]", "training.max_steps=2",
                           "training.eval_every=1")  # fmt: skip
    assert summary["eval_loss"] is None
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["eval_loss"] is None
    assert all("eval_loss" not in row for row in metrics(summary["run_dir"]))
    assert capsys.readouterr().err.count("warning: the held-out split holds no sequence") == 1


def test_summary_says_when_a_model_cannot_be_exported(tmp_path, capsys):
    run(tmp_path, "model.convert.lrc_rank=4", "training.quant_warmup.steps=0", "training.max_steps=1")
    out = capsys.readouterr().out
    assert "export to GGUF: not available for this model: transformers' BitNet has no low-rank correction" in out
    assert "python -m wrinklefree.export" not in out


def test_null_batch_settings_come_from_the_gpu_table(tmp_path):
    cfg = config(tmp_path, "training.batch_size=null", "training.grad_accum=3")
    table = {"tiny": {"default": {"batch_size": 5, "grad_accum": 7}}}
    assert batch_settings(cfg, table) == (5, 3)
    cfg.training.grad_accum = None
    assert batch_settings(cfg, table) == (5, 7)
    assert int_setting(cfg, "training.max_steps", 0) == cfg.training.max_steps


def test_cli_errors_are_one_line_for_the_packages_own_errors(tmp_path, capsys):
    cfg = config(tmp_path, "training.max_steps=-1")
    with pytest.raises(SystemExit) as exit_info, cli_errors():
        int_setting(cfg, "training.max_steps", 0)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: training.max_steps must be an integer >= 0, got -1\n"
    with pytest.raises(ValueError, match="not ours"), cli_errors():  # raised outside the package: kept as is
        raise ValueError("not ours")


@pytest.mark.parametrize(
    ("module", "override", "message"),
    [
        ("wrinklefree.train", "device=tpu", "error: device must be auto, cpu or cuda, got 'tpu'"),
        ("wrinklefree.train", "training.max_steps=abc", "error: training.max_steps must be an integer >= 0"),
        ("wrinklefree.pipeline", "training=unified", "error: training=unified is a single recipe, not a pipeline"),
    ],
)
def test_cli_reports_bad_settings_in_one_line_with_exit_code_2(tmp_path, module, override, message):
    cmd = [sys.executable, "-m", module, f"output_dir={tmp_path}", override]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [proc.stderr.splitlines()[-1]]
    assert proc.stderr.splitlines()[-1].startswith(message)


def test_a_new_run_refuses_the_checkpoints_of_an_earlier_one(tmp_path):
    common = ["training.eval_every=0", "training.save_every=2", "experiment=again"]
    _, summary = run(tmp_path, *common, "training.max_steps=4")
    final = Path(summary["checkpoint"])
    stamp = (final / ".metadata").stat().st_mtime_ns
    trainer = Trainer(config(tmp_path, *common, "training.max_steps=3"))
    try:
        with pytest.raises(FileExistsError, match=r"\(final, step_2\).*training.resume.checkpoint_path=latest"):
            trainer.fit()
    finally:
        trainer.close()
    assert (final / ".metadata").stat().st_mtime_ns == stamp  # the earlier run is untouched
    assert [r["step"] for r in metrics(summary["run_dir"])] == [1, 2, 3, 4]
    # overwrite=true replaces it: its checkpoints removed first, the metrics file started anew
    _, again = run(tmp_path, *common, "training.max_steps=3", "overwrite=true")
    assert [r["step"] for r in metrics(again["run_dir"])] == [1, 2, 3]
    assert sorted(p.name for p in final.parent.iterdir()) == ["final", "step_2"]
    assert torch.load(final / "trainer_rank0.pt", weights_only=False)["step"] == 3
    # resuming it is no new run
    _, resumed = run(tmp_path, *common, "training.max_steps=5", "training.resume.checkpoint_path=latest")
    assert [r["step"] for r in metrics(resumed["run_dir"])] == [1, 2, 3, 4, 5]


def test_a_run_shorter_than_its_warm_ups_says_what_that_means(tmp_path, capsys):
    # the defaults of training=unified: the quantization warms up over 60 steps, the learning rate over 30
    run(tmp_path, "training.max_steps=3", "training.eval_every=0")
    captured = capsys.readouterr()
    assert "warning: training.max_steps=3 is shorter than the quantization warm-up (training.quant_warmup" in (
        captured.err
    )
    assert "the run ends at lam 0.05, not fully ternary" in captured.err
    assert "warning: the learning-rate warm-up (training.lr_schedule.warmup_steps=30) is longer than" in captured.err
    assert "export to GGUF: not yet: the quantization warm-up is at lam 0.05" in captured.out
    run(tmp_path / "b", "training.max_steps=3", "training.eval_every=0", "training.quant_warmup.steps=2",
        "training.lr_schedule.warmup_steps=3")  # fmt: skip
    captured = capsys.readouterr()
    assert "[wrinklefree] warning" not in captured.err
    assert "export to GGUF: python -m wrinklefree.export" in captured.out


class FakeWandb(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("wandb")
        self.modes: list[str] = []

    def init(self, *, mode: str, **kwargs):
        self.modes.append(mode)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, None),
        ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, "offline"),
        ({"WANDB_API_KEY": "k"}, "online"),
        ({}, "offline"),
    ],
)
def test_wandb_respects_an_explicit_wandb_mode(tmp_path, monkeypatch, env, mode):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    logger = MetricsLogger(tmp_path, wandb_cfg={"enabled": True})
    logger.close()
    assert fake.modes == ([] if mode is None else [mode])
    assert logger.wandb_mode == (mode or "disabled")


def test_metrics_file_appends_only_when_asked(tmp_path):
    for append in (True, True, False):
        logger = MetricsLogger(tmp_path, append=append)
        logger.log(1, {"loss": 1.0})
        logger.close()
    assert len(metrics(tmp_path)) == 1
