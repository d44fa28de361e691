"""BitDistill stages through the trainer, and `python -m wrinklefree.pipeline` from a teacher to a GGUF file."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_train import metrics, one_and_two_ranks

from wrinklefree.inference import Engine
from wrinklefree.pipeline import Pipeline, stage_config
from wrinklefree.train.checkpoint import read_trainer_state, rebuild_model
from wrinklefree.train.trainer import Trainer

# a model whose projections pack to I2_S (widths multiples of 128), trained on a little of the built-in corpus
SMALL = [
    "model.config.hidden_size=128",
    "model.config.intermediate_size=256",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "model.config.max_position_embeddings=64",
    "data.seq_len=32",
    "data.vocab_size=300",
    "data.sources.0.max_chars=300000",
]
# merged into each run's training node (a pipeline's `common`)
STEPS = {
    "max_steps": 2,
    "batch_size": 2,
    "grad_accum": 1,
    "eval_every": 0,
    "log_every": 1,
    "logging": {"wandb": {"enabled": False}},
}


def compose_config(out: Path, *overrides: str, name: str = "config"):
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        return compose(name, overrides=[f"output_dir={out}", *SMALL, *overrides])


def run(cfg) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A full-precision teacher trained for a few steps and saved as a transformers directory."""
    from wrinklefree.pipeline import save_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_config(out, "training=fp_pretrain", "experiment=t")
    cfg.training = OmegaConf.merge(cfg.training, STEPS)
    _, summary = run(cfg)
    return save_teacher(Path(summary["checkpoint"]), out / "hf")


def stage(out: Path, teacher: Path, recipe: str, *overrides: str):
    cfg = compose_config(out, f"training={recipe}", f"model.pretrained={teacher}", "experiment=e", *overrides)
    cfg.training = OmegaConf.merge(cfg.training, STEPS)
    return cfg


def test_stage3_trains_ce_logits_and_attention_distillation(tmp_path, teacher_dir):
    cfg = stage(tmp_path, teacher_dir, "stage3_distill", "training.init_from=none",
                "training.objectives.attention_kd.relation_heads=8")  # fmt: skip
    trainer, summary = run(cfg)
    logged = metrics(summary["run_dir"])
    last = logged[-1]
    assert {"loss_ce", "loss_logits_kd", "loss_attention_kd"} <= set(last)
    w = cfg.training.objectives
    total = last["loss_ce"] + w.logits_kd.weight * last["loss_logits_kd"]
    total += w.attention_kd.weight * last["loss_attention_kd"]
    assert last["loss"] == pytest.approx(total, rel=1e-5)
    assert summary["loss_name"] == "ce" and trainer.schedule.full  # ternary from the first step
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert Path(summary["run_dir"]).name == "stage3_distill"  # a named experiment logs per stage
    # the first step measured each weighted objective's gradient alone, for calibrating beta and gamma
    first = logged[0]
    for name in ("ce", "logits_kd", "attention_kd"):
        assert first[f"grad_norm_{name}"] > 0
    assert "grad_norm_ce" not in last
    # ... without changing the step
    cfg.output_dir = str(tmp_path / "no_probe")
    cfg.training.objective_grad_norms = False
    _, plain = run(cfg)
    rows = metrics(plain["run_dir"])
    assert "grad_norm_ce" not in rows[0]
    assert rows[-1]["loss"] == pytest.approx(last["loss"], rel=1e-6)


def test_lrc_calibration_trains_only_the_correction(tmp_path, teacher_dir):
    cfg = stage(tmp_path, teacher_dir, "lrc_calibration", "training.init_from=none")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    after = trainer.raw_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".lrc_u", ".lrc_v")) for k in changed)
    assert any(k.endswith(".lrc_u") for k in changed)
    assert summary["loss_name"] == "hidden"
    assert trainer.n_trainable < trainer.n_params


def test_the_teacher_can_be_a_trainer_checkpoint(tmp_path, teacher_dir):
    fp = compose_config(tmp_path, "training=fp_pretrain", "experiment=t")
    fp.training = OmegaConf.merge(fp.training, STEPS, {"max_steps": 1})
    _, summary = run(fp)
    cfg = stage(tmp_path, teacher_dir, "stage1_9_layerwise", "training.init_from=none",
                f"training.teacher={summary['checkpoint']}")  # fmt: skip
    trainer, _ = run(cfg)
    saved, _, _ = rebuild_model(summary["checkpoint"])
    embed = trainer.teacher.get_input_embeddings().weight
    assert torch.equal(embed, saved.get_input_embeddings().weight)  # the fp_pretrain run's weights
    assert not embed.requires_grad and not trainer.teacher.training


def test_distillation_without_a_teacher_says_what_to_set(tmp_path):
    cfg = compose_config(tmp_path, "training=stage3_distill", "training.init_from=none")
    with pytest.raises(ValueError, match="training.teacher .* or model.pretrained"):
        Trainer(cfg)


def test_pipeline_settings_with_unknown_keys_are_errors(tmp_path):
    cfg = compose_config(tmp_path, name="pipeline")
    with pytest.raises(ValueError, match="stage2_pretrain"):
        stage_config(cfg, "stage2_pretrain", {"max_stepz": 3})


def test_pipeline_without_held_out_text_stops_before_training(tmp_path, monkeypatch):
    from wrinklefree import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "teacher", lambda self: pytest.fail("trained before the check"))
    cfg = compose_config(tmp_path, "data.eval_fraction=0", name="pipeline")
    with pytest.raises(ValueError, match=r"training.eval.sequences=\d+ evaluates held-out text, and data.eval_"):
        pipeline.Pipeline(cfg).run()


def test_pipeline_resumes_a_stage_an_earlier_run_left_unfinished(tmp_path, monkeypatch):
    import wrinklefree.pipeline as pipeline

    cfg = compose_config(tmp_path, "training=bitdistill_tiny", "experiment=p", name="pipeline")
    step = tmp_path / "checkpoints" / "p" / "stage2_pretrain_checkpoint" / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")  # what makes a local checkpoint complete
    seen = []

    def fake_run_stage(stage_cfg):
        seen.append(stage_cfg.training.resume.checkpoint_path)
        return {"seconds": 0.0, "checkpoint": "done"}

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    pipe = Pipeline(cfg)
    for stage in ("stage2_pretrain", "stage3_distill"):
        pipe._run(stage, stage_config(cfg, stage))
    assert seen == [str(step), None]  # the unfinished stage continues; one that never ran starts fresh
    cfg.overwrite = True  # starts it again (the trainer removes the earlier checkpoints)
    Pipeline(cfg)._run("stage2_pretrain", stage_config(cfg, "stage2_pretrain"))
    assert seen[-1] is None


def test_pipeline_runs_the_chain_reports_and_skips_what_exists(tmp_path, capsys):
    chain = {
        "stage1_subln": {"max_steps": 0},  # conversion only, as in the recipe
        "stage1_9_layerwise": {},
        "stage2_pretrain": {"quant_warmup": {"steps": 1}},
        "stage3_distill": {"objectives": {"attention_kd": {"relation_heads": 8}}},
        "lrc_calibration": {},
        "direct_ternary": {"max_steps": 6},
        "fp_continue": {"max_steps": 6},
    }
    overrides = ["training=bitdistill_tiny", "experiment=chain", "training.eval.sequences=4"]
    cfg = compose_config(tmp_path, *overrides, name="pipeline")
    cfg.training.teacher_training = {"max_steps": 3}
    cfg.training.common = STEPS
    cfg.training.stages = chain
    rows = {r.name: r for r in Pipeline(cfg).run()}

    assert list(rows) == ["teacher", *chain, "gguf"]
    assert all(r.status == "ran" for r in rows.values())
    assert (tmp_path / "checkpoints" / "chain" / "teacher" / "config.json").is_file()
    assert rows["stage3_distill"].steps == 2 and rows["direct_ternary"].steps == 6
    # the data: each stage continues where the run it starts from stopped, the first ones after the teacher,
    # so the three paths from the teacher (1.9 + 2 + 3, CE only, full precision) read the same 6 batches
    data = {name: read_trainer_state(rows[name].path)["data"] for name in chain if name != "lrc_calibration"}
    teacher_data = read_trainer_state(tmp_path / "checkpoints" / "chain" / "fp_pretrain_checkpoint" /
                                      "checkpoints" / "final")["data"]  # fmt: skip
    assert teacher_data["step"] == 3 and data["stage1_subln"] == teacher_data
    assert data["stage1_9_layerwise"]["step"] == 5 and data["stage2_pretrain"]["step"] == 7
    for name in ("stage3_distill", "direct_ternary", "fp_continue"):
        assert data[name]["step"] == 9 and data[name]["streams"] == data["stage3_distill"]["streams"], name
    assert data["stage3_distill"]["streams"] != teacher_data["streams"]
    assert rows["gguf"].path.endswith("stage3_distill.gguf")
    assert Engine(rows["gguf"].path).arch == "bitnet-b1.58"  # outtype auto: i2_s for the relu2 model
    for r in rows.values():
        assert r.ppl is not None and r.ppl > 1, r.name
    # the GGUF file run by the engine scores as the PyTorch model it came from
    assert rows["gguf"].nll == pytest.approx(rows["stage3_distill"].nll, abs=2e-3)
    report = json.loads((tmp_path / "runs" / "chain" / "pipeline.json").read_text())
    assert [r["name"] for r in report["rows"]] == list(rows)
    out = capsys.readouterr().out
    assert "(d) BitDistill [stage3_distill]" in out and "(c) direct ternary training" in out
    assert "(a') teacher trained on in full precision" in out

    # a second run trains nothing: every stage's output is there; the recorded figures are reported again
    stamp = (Path(rows["stage2_pretrain"].path) / ".metadata").stat().st_mtime_ns
    again = {r.name: r for r in Pipeline(cfg).run()}
    assert all(r.status == "skipped" for r in again.values())
    assert (Path(rows["stage2_pretrain"].path) / ".metadata").stat().st_mtime_ns == stamp
    assert again["stage3_distill"].steps == 2
    assert again["stage3_distill"].ppl == pytest.approx(rows["stage3_distill"].ppl)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp_multi"])
def test_stage3_on_two_cpu_ranks_matches_one_rank(tmp_path, teacher_dir, strategy):
    # the distillation losses are deterministic, so 2 ranks x 1 sequence x 2 accumulated micro-batches
    # compute what 1 rank x 4 sequences does

    common = [
        *SMALL,
        "training=stage3_distill",
        f"model.pretrained={teacher_dir}",
        "training.init_from=none",
        "training.objectives.attention_kd.relation_heads=8",
        "training.max_steps=3",
        "training.eval_every=0",
        "training.log_every=1",
        "training.logging.wandb.enabled=false",
        "experiment=s3",
    ]
    one_and_two_ranks(tmp_path, common, strategy)
    a, b = (metrics(tmp_path / run / "runs" / "s3" / "stage3_distill") for run in ("one", "two"))
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_ce", "loss_logits_kd", "loss_attention_kd"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key
    assert (tmp_path / "two" / "checkpoints" / "s3" / "stage3_distill_checkpoint" / "checkpoints" / "final").is_dir()
