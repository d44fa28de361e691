"""Checkpoints (DCP, atomic saves, keep-last, remote mirror through fsspec) and stage discovery (DESIGN.md section 5).

Everything is local: remote storage is fsspec's ``memory://`` or ``file://`` filesystem, and the hub is a
``snapshot_download`` replaced by a copy from a local folder.
"""

import fnmatch
import json
import os
import shutil
import uuid
from pathlib import Path

import huggingface_hub  # noqa: E402
import pytest
import torch
import torch.distributed.checkpoint as dcp  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from wrinklefree.models import convert  # noqa: E402
from wrinklefree.train import discovery  # noqa: E402
from wrinklefree.train.checkpoint import (  # noqa: E402
    COMPLETE_MARKER,
    CheckpointManager,
    IncompatibleCheckpointError,
    filesystem,
    find_checkpoint,
    load_weights,
    parse_hub,
    read_trainer_state,
    stage_dir,
)
from wrinklefree.train.trainer import Trainer  # noqa: E402

# ---- helpers ------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, hidden: int = 32, lrc_rank=None) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    convert(model, subln="standard", activation="relu2", skip=["lm_head"], lrc_rank=lrc_rank)
    return model


def train_one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return opt


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def memory_root():
    """A fresh ``memory://`` bucket, removed afterwards (the memory filesystem is process-wide)."""
    root = f"memory://wf-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs, path = filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class MissingRepo(Exception):
    """What the fake hub raises for an unknown repo (the real one raises RepositoryNotFoundError)."""


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root  # {root}/{repo_id}/... is the repo's content
        self.calls: list[dict] = []


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """``snapshot_download`` served from ``{tmp}/hub/{repo_id}``, honouring ``allow_patterns``; the calls are
    recorded."""
    fake = FakeHub(tmp_path / "hub")
    hub, calls = fake.root, fake.calls

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        src = hub / repo_id
        if not src.is_dir():
            raise MissingRepo(f"no repo {repo_id}")
        snap = tmp_path / "hub-cache" / repo_id.replace("/", "--") / (revision or "main")
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, snap / rel)
        snap.mkdir(parents=True, exist_ok=True)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fake


# ---- saving, loading, pruning -------------------------------------------------------------------


def test_round_trip_restores_model_optimizer_and_trainer_state(tmp_path):
    model = tiny_model(0)
    opt = train_one_step(model)
    manager = CheckpointManager(stage_dir(tmp_path, "exp", "unified"))
    path = manager.save("step_1", model, opt, {"step": 1, "extra": [1, 2]})
    assert path == tmp_path / "checkpoints/exp/unified_checkpoint/checkpoints/step_1"
    assert (path / ".metadata").is_file() and (path / "trainer_rank0.pt").is_file()

    other = tiny_model(1)
    other_opt = train_one_step(other)
    assert not same_weights(model, other)
    state = CheckpointManager.load(path, other, other_opt)
    assert state["step"] == 1 and state["extra"] == [1, 2]
    assert same_weights(model, other)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], other_opt.state[q][key]), key


def test_keep_last_prunes_old_steps_but_never_final(tmp_path):
    model = tiny_model()
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3, 4):
        manager.save(f"step_{step}", model, None, {"step": step})
    assert [s for s, _ in manager.steps()] == [3, 4]
    assert manager.latest() == tmp_path / "ckpt" / "step_4"
    manager.save("final", model, None, {"step": 4})
    manager.save("step_5", model, None, {"step": 5})
    assert [s for s, _ in manager.steps()] == [4, 5]
    assert manager.latest() == tmp_path / "ckpt" / "final"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["final", "step_4", "step_5"]
    assert [s for s, _ in CheckpointManager(tmp_path / "all", keep=0).steps()] == []


def test_find_checkpoint_takes_a_stage_directory_or_its_checkpoints_folder(tmp_path):
    stage = stage_dir(tmp_path, "exp", "unified")  # .../unified_checkpoint/checkpoints
    for name in ("step_2", "step_10", ".tmp-step_11"):  # the last one unfinished (no .metadata)
        (stage / name).mkdir(parents=True)
    for name in ("step_2", "step_10"):
        (stage / name / ".metadata").write_bytes(b"")
    for given in (stage, stage.parent, stage / "step_2"):
        assert find_checkpoint(given) == (stage / "step_2" if given.name == "step_2" else stage / "step_10")
    (stage / "final").mkdir()
    (stage / "final" / ".metadata").write_bytes(b"")
    assert find_checkpoint(stage) == find_checkpoint(stage.parent) == stage / "final"
    assert find_checkpoint(stage.parent.parent) is None  # the experiment's folder: not a stage
    (tmp_path / "empty_checkpoint" / "checkpoints").mkdir(parents=True)
    assert find_checkpoint(tmp_path / "empty_checkpoint") is None
    assert find_checkpoint(tmp_path / "missing") is None


def test_a_run_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model(0)
    opt = train_one_step(model)
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    good = manager.save("step_1", model, opt, {"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_step(model)  # the weights the killed save was writing differ from the saved ones

    real_save = dcp.save

    def killed(state, checkpoint_id, **kw):  # writes part of the files, then the process "dies"
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"\0" * 100)
        Path(checkpoint_id, ".metadata").write_bytes(b"truncated")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save("step_2", model, opt, {"step": 2})
    leftover = tmp_path / "ckpt" / ".tmp-step_2"
    assert leftover.is_dir()  # what a killed run leaves behind ...
    assert manager.latest() == good and [s for s, _ in manager.steps()] == [1]  # ... is ignored

    fresh = tiny_model(5)
    assert CheckpointManager.load(manager.latest(), fresh)["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

    monkeypatch.setattr(dcp, "save", real_save)
    manager.save("step_3", model, opt, {"step": 3})
    assert not leftover.exists()  # the next save cleans it up
    assert [s for s, _ in manager.steps()] == [1, 3]


def test_a_run_killed_while_replacing_a_checkpoint_keeps_the_old_one(tmp_path):
    model = tiny_model(0)
    manager = CheckpointManager(tmp_path / "ckpt")
    final = manager.save("final", model, None, {"step": 7})
    aside = tmp_path / "ckpt" / ".tmp-old-final"
    os.replace(final, aside)  # killed between "move the old one aside" and "rename the new one in"
    assert manager.latest() == aside
    assert CheckpointManager.load(manager.latest(), tiny_model(3))["step"] == 7
    manager.save("step_8", model, None, {"step": 8})  # the next save puts it back
    assert (final / ".metadata").is_file() and not aside.exists() and manager.latest() == final
    # replacing final keeps exactly one
    manager.save("final", model, None, {"step": 9})
    assert CheckpointManager.load(final, tiny_model(3))["step"] == 9
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


def test_extra_files_appear_with_the_checkpoint_and_a_failure_leaves_none(tmp_path, memory_root):
    model = tiny_model(0)
    manager = CheckpointManager(tmp_path / "ckpt", remote=stage_dir(memory_root, "exp", "unified"))
    seen = []

    def write_notes(staging: Path) -> None:
        seen.append(staging)
        (staging / "notes").mkdir()
        (staging / "notes" / "a.txt").write_text("hello")

    final = manager.save("final", model, None, {"step": 1}, extra_files=write_notes)
    assert seen == [tmp_path / "ckpt" / ".tmp-final"]  # staged, then renamed into place with the rest
    assert (final / "notes" / "a.txt").read_text() == "hello" and (final / ".metadata").is_file()
    fs, root = filesystem(manager.remote)
    assert fs.cat(f"{root}/final/notes/a.txt") == b"hello"  # uploaded with the checkpoint

    def fail(staging: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save("step_2", model, None, {"step": 2}, extra_files=fail)
    assert manager.steps() == [] and manager.latest() == final


# ---- remote mirror through fsspec ---------------------------------------------------------------


def test_checkpoints_are_mirrored_complete_with_marker_and_pruned(tmp_path, memory_root):
    model = tiny_model(0)
    opt = train_one_step(model)
    remote = stage_dir(memory_root, "exp", "stage2_pretrain")
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, remote=remote)
    for step in (1, 2, 3):
        manager.save(f"step_{step}", model, opt, {"step": step})
    manager.save("final", model, opt, {"step": 3})  # waits for its own upload
    assert [s for s, _ in manager.remote_steps()] == [2, 3]
    fs, root = filesystem(remote)
    manifest = json.loads(fs.cat(f"{root}/final/{COMPLETE_MARKER}"))
    assert manifest["name"] == "final" and {".metadata", "__0_0.distcp", "trainer_rank0.pt"} <= set(manifest["files"])
    for rel, size in manifest["files"].items():
        assert fs.size(f"{root}/final/{rel}") == size

    # a fresh machine (empty local disk): latest() and load() work from the remote copy alone
    elsewhere = CheckpointManager(tmp_path / "empty", remote=remote)
    assert elsewhere.latest() == f"{remote}/final"
    other = tiny_model(1)
    other_opt = train_one_step(other)
    assert CheckpointManager.load(elsewhere.latest(), other, other_opt)["step"] == 3
    assert same_weights(model, other)


def test_an_unfinished_upload_is_ignored_reported_and_cleaned(tmp_path, memory_root, monkeypatch):
    model = tiny_model(0)
    remote = stage_dir(memory_root, "exp", "unified")
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, remote=remote)
    manager.save("step_1", model, None, {"step": 1})
    manager.wait()
    fs, root = filesystem(remote)
    real_put = type(fs).put

    def dies_half_way(self, lpaths, rpaths, **kw):
        real_put(self, lpaths[:1], rpaths[:1])
        raise ConnectionError("connection reset")

    monkeypatch.setattr(type(fs), "put", dies_half_way)
    manager.save("step_2", model, None, {"step": 2})  # the local checkpoint is there; the upload fails behind
    assert (tmp_path / "ckpt" / "step_2" / ".metadata").is_file()
    manager._upload_thread.join()
    assert fs.exists(f"{root}/step_2") and not fs.exists(f"{root}/step_2/{COMPLETE_MARKER}")
    assert [s for s, _ in manager.remote_steps()] == [1]
    assert CheckpointManager(tmp_path / "empty", remote=remote).latest() == f"{remote}/step_1"
    with pytest.raises(FileNotFoundError, match="no .complete marker"):
        load_weights(f"{remote}/step_2", tiny_model())

    # the next save reports it, once its own local checkpoint is complete
    with pytest.raises(RuntimeError, match=r"upload to memory://.*connection reset .*local checkpoints .* complete"):
        manager.save("step_3", model, None, {"step": 3})
    assert [s for s, _ in manager.steps()] == [2, 3]

    monkeypatch.setattr(type(fs), "put", real_put)
    manager.save("step_4", model, None, {"step": 4})
    manager.wait()
    assert [s for s, _ in manager.remote_steps()] == [1, 4] and not fs.exists(f"{root}/step_2")


def test_replacing_a_remote_checkpoint_removes_its_marker_first(tmp_path, memory_root, monkeypatch):
    model = tiny_model(0)
    remote = stage_dir(memory_root, "exp", "unified")
    manager = CheckpointManager(tmp_path / "ckpt", remote=remote)
    manager.save("final", model, None, {"step": 1})
    fs, root = filesystem(remote)
    monkeypatch.setattr(type(fs), "put", lambda self, *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(RuntimeError, match="down"):
        manager.save("final", model, None, {"step": 2})
    # complete or absent: never the old marker over half-replaced files
    assert not fs.exists(f"{root}/final/{COMPLETE_MARKER}")
    assert CheckpointManager(tmp_path / "empty", remote=remote).latest() is None


def test_file_urls_work_like_any_other_fsspec_filesystem(tmp_path):
    model = tiny_model(0)
    remote = stage_dir(f"file://{tmp_path}/bucket", "exp", "unified")
    CheckpointManager(tmp_path / "ckpt", remote=remote).save("final", model, None, {"step": 1})
    assert (tmp_path / "bucket/checkpoints/exp/unified_checkpoint/checkpoints/final" / COMPLETE_MARKER).is_file()
    other = tiny_model(1)
    assert load_weights(f"{remote}/final", other) == len(model.state_dict())
    assert same_weights(model, other)


def test_remote_errors_are_clear():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"gs://bucket/wf: gs:// URLs need gcsfs \(pip install gcsfs\)"):
            CheckpointManager("/tmp/unused", remote="gs://bucket/wf")
    with pytest.raises(ValueError, match="training.hub_repo"):
        CheckpointManager("/tmp/unused", remote="hf://owner/repo")
    with pytest.raises(ValueError, match="expected an fsspec URL"):
        CheckpointManager("/tmp/unused", remote="/just/a/path")
    with pytest.raises(ValueError, match="does not know the protocol nosuch://"):
        filesystem("nosuch://x/y")


# ---- weights-only loading and its errors --------------------------------------------------------


def test_load_weights_names_the_path_and_the_keys(tmp_path):
    model = tiny_model(0)
    path = CheckpointManager(tmp_path / "ckpt").save("final", model, None, {"step": 0})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nowhere is not a checkpoint directory"):
        load_weights(tmp_path / "nowhere", model)

    wider = tiny_model(0, hidden=48)
    with pytest.raises(IncompatibleCheckpointError) as err:
        load_weights(path, wider)
    msg = str(err.value)
    assert str(path) in msg and "different shapes" in msg
    assert "model.embed_tokens.weight (checkpoint [64, 32], model [64, 48])" in msg

    with_lrc = tiny_model(0, lrc_rank=2)
    with pytest.raises(IncompatibleCheckpointError, match=r"missing from the checkpoint: .*lrc_v"):
        load_weights(path, with_lrc)
    before = {k: v.clone() for k, v in with_lrc.state_dict().items() if "lrc" in k}
    n = load_weights(path, with_lrc, allow_missing=["*.lrc_u", "*.lrc_v"])
    assert n == len(model.state_dict())
    assert all(torch.equal(with_lrc.state_dict()[k], v) for k, v in before.items())  # kept as built
    assert torch.equal(with_lrc.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])

    with pytest.raises(IncompatibleCheckpointError, match=r"not in the model: .*lrc_u"):
        load_weights(CheckpointManager(tmp_path / "lrc").save("final", with_lrc, None, {}), tiny_model(0))


def test_load_weights_converts_dtypes_and_leaves_the_optimizer_alone(tmp_path):
    model = tiny_model(0)
    path = CheckpointManager(tmp_path / "ckpt").save("final", model, train_one_step(model), {"step": 1})
    half = tiny_model(1).to(torch.bfloat16)
    opt = torch.optim.AdamW(half.parameters())
    load_weights(path, half)
    assert not opt.state
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(half.state_dict()["model.layers.0.mlp.up_proj.weight"], w.to(torch.bfloat16))


# ---- discovery ----------------------------------------------------------------------------------


def test_parse_hub_specs():
    assert parse_hub("hf://me/ckpts/checkpoints/x/final") == ("me/ckpts", None, "checkpoints/x/final")
    assert parse_hub("hf://me/ckpts@v1/a") == ("me/ckpts", "v1", "a")
    assert parse_hub("hf://me/ckpts") == ("me/ckpts", None, "")
    with pytest.raises(ValueError, match="hf://owner/name"):
        parse_hub("hf://lonely")


def test_every_recipe_has_a_row_in_the_discovery_table():
    recipes = Path(__file__).parents[1] / "configs" / "training"
    # pipeline recipes (a `stages:` chain, such as bitdistill_full) run stages; they are not one
    stages = {p.stem for p in recipes.glob("*.yaml") if not p.stem.startswith("_") and "\nstages:" not in p.read_text()}
    assert stages == set(discovery.PREVIOUS_STAGES)
    for before in discovery.PREVIOUS_STAGES.values():
        assert set(before) <= stages


@pytest.mark.parametrize(
    ("stage", "present", "expected"),
    [
        ("stage2_pretrain", ["stage1_subln", "stage1_9_layerwise"], "stage1_9_layerwise"),
        ("stage2_pretrain", ["stage1_subln"], "stage1_subln"),
        ("stage3_distill", ["stage1_subln", "stage1_9_layerwise", "stage2_pretrain"], "stage2_pretrain"),
        ("lrc_calibration", ["stage2_pretrain", "stage3_distill"], "stage3_distill"),
        ("lrc_calibration", ["stage2_pretrain"], "stage2_pretrain"),
        ("direct_ternary", ["stage1_subln", "stage2_pretrain", "stage3_distill"], "stage1_subln"),
        ("stage3_distill", ["stage1_subln"], None),
    ],
)
def test_each_stage_starts_from_the_most_trained_previous_stage(tmp_path, stage, present, expected):
    model = tiny_model()
    for prev in present:
        _final(tmp_path, "exp", prev, model)
    _final(tmp_path, "another", "stage2_pretrain", model)  # another experiment's checkpoints are not looked at
    source, found, _ = discovery.find_stage_checkpoint(discovery.PREVIOUS_STAGES[stage], "exp", tmp_path)
    assert found == expected
    if expected is not None:
        assert source == str(tmp_path / "checkpoints" / "exp" / f"{expected}_checkpoint" / "checkpoints" / "final")


def _final(root, experiment: str, stage: str, model) -> None:
    CheckpointManager(stage_dir(root, experiment, stage), remote=None).save("final", model, None, {"step": 0})


def test_discovery_looks_locally_then_remotely_then_on_the_hub(tmp_path, memory_root, fake_hub):
    model = tiny_model()
    out = tmp_path / "out"
    look = ("stage1_9_layerwise", "stage1_subln")  # what stage2_pretrain starts from
    args = ("exp", out, memory_root, "me/ckpts")

    hub_ckpt = fake_hub.root / "me/ckpts"
    hub_ckpt.mkdir(parents=True)  # the repo exists, without the folders looked for
    source, stage, looked = discovery.find_stage_checkpoint(look, *args)
    assert source is None and stage is None
    assert looked == [
        f"{out}/checkpoints/exp/stage1_9_layerwise_checkpoint/checkpoints/final",
        f"{memory_root}/checkpoints/exp/stage1_9_layerwise_checkpoint/checkpoints/final",
        "hf://me/ckpts/checkpoints/exp/stage1_9_layerwise_checkpoint/checkpoints/final",
        f"{out}/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final",
        f"{memory_root}/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final",
        "hf://me/ckpts/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final",
    ]
    assert len(fake_hub.calls) == 2

    _final(hub_ckpt, "exp", "stage1_subln", model)
    _final(hub_ckpt, "other", "stage1_subln", model)  # another experiment's folder is not downloaded
    source, stage, _ = discovery.find_stage_checkpoint(look, *args)
    assert source == "hf://me/ckpts/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final"
    assert stage == "stage1_subln"
    assert fake_hub.calls[-1]["allow_patterns"] == ["checkpoints/exp/stage1_subln_checkpoint/checkpoints/final/*"]

    CheckpointManager(out / "scratch", remote=stage_dir(memory_root, "exp", "stage1_subln")).save(
        "final", model, None, {}
    )
    source, _, _ = discovery.find_stage_checkpoint(look, *args)
    assert source == f"{memory_root}/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final"

    _final(out, "exp", "stage1_subln", model)
    source, _, _ = discovery.find_stage_checkpoint(look, *args)
    assert source == f"{out}/checkpoints/exp/stage1_subln_checkpoint/checkpoints/final"

    # a later stage found remotely beats an earlier one found locally
    CheckpointManager(out / "scratch2", remote=stage_dir(memory_root, "exp", "stage1_9_layerwise")).save(
        "final", model, None, {}
    )
    source, stage, _ = discovery.find_stage_checkpoint(look, *args)
    assert stage == "stage1_9_layerwise" and source.startswith("memory://")


def test_a_missing_hub_repo_is_an_error_not_none_found(tmp_path, fake_hub):
    with pytest.raises(MissingRepo):
        discovery.find_stage_checkpoint(("stage1_subln",), "exp", tmp_path, None, "me/absent")


# ---- through the trainer ------------------------------------------------------------------------

TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.config.max_position_embeddings=64",
    "data.seq_len=32",
    "data.vocab_size=300",
    "data.sources.0.max_chars=100000",
    "data.eval_fraction=0",
    "training.batch_size=2",
    "training.grad_accum=1",
    "training.logging.wandb.enabled=false",
]


def trainer(out: Path, *overrides: str) -> Trainer:
    with initialize_config_module("wrinklefree.configs", version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", *TINY, *overrides])
    return Trainer(cfg)


def stage1(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """Run stage 1 (convert and save) for experiment ``chain``; returns its weights."""
    t = trainer(out, "training=stage1_subln", "experiment=chain", "seed=1", *overrides)
    try:
        t.fit()
        return {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    finally:
        t.close()


def weights_of(t: Trainer) -> dict[str, torch.Tensor]:
    return t.raw_model.state_dict()


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_starts_from_stage1_final_found_locally(tmp_path, capsys):
    w1 = stage1(tmp_path)
    t = trainer(tmp_path, "training=stage2_pretrain", "experiment=chain", "seed=2", "training.max_steps=1")
    try:
        assert equal(weights_of(t), w1)
        assert t.step == 0 and not t.optimizer.state
        t.fit()
    finally:
        t.close()
    err = capsys.readouterr().err
    assert "init_from=auto: stage2_pretrain starts from stage1_subln's final checkpoint" in err
    assert "stage1_subln_checkpoint/checkpoints/final (local;" in err

    # the same with init_from=none, or without an experiment name: the model config's weights, said so
    t = trainer(tmp_path, "training=stage2_pretrain", "experiment=chain", "seed=2", "training.init_from=none")
    try:
        assert not equal(weights_of(t), w1)
    finally:
        t.close()
    t = trainer(tmp_path, "training=stage2_pretrain", "seed=2")
    try:
        assert not equal(weights_of(t), w1)
    finally:
        t.close()
    assert "experiment is not set" in capsys.readouterr().err


def test_stage2_finds_stage1_in_the_remote_dir_on_a_fresh_disk(tmp_path, memory_root, capsys):
    w1 = stage1(tmp_path / "machine-a", f"training.remote_dir={memory_root}/wf")
    t = trainer(
        tmp_path / "machine-b",
        "training=stage2_pretrain",
        "experiment=chain",
        "seed=2",
        f"training.remote_dir={memory_root}/wf",
    )
    try:
        assert equal(weights_of(t), w1)
    finally:
        t.close()
    err = capsys.readouterr().err
    assert f"{memory_root}/wf/checkpoints/chain/stage1_subln_checkpoint/checkpoints/final (remote;" in err
    assert "no final checkpoint" not in err


def test_nothing_found_starts_from_the_model_config_and_says_where_it_looked(tmp_path, capsys):
    t = trainer(tmp_path, "training=stage2_pretrain", "experiment=lonely")
    t.close()
    err = capsys.readouterr().err
    assert "init_from=auto: no final checkpoint of stage1_9_layerwise or stage1_subln for experiment lonely" in err
    assert f"{tmp_path}/checkpoints/lonely/stage1_subln_checkpoint/checkpoints/final" in err
    assert "starting from the model config" in err


def test_explicit_init_from_path_stage_and_hub(tmp_path, fake_hub, capsys):
    w1 = stage1(tmp_path / "a")
    final = tmp_path / "a/checkpoints/chain/stage1_subln_checkpoint/checkpoints/final"
    shutil.copytree(final, fake_hub.root / "me/ckpts/export/final")

    for init in (str(final), "hf://me/ckpts@v2/export/final"):
        t = trainer(tmp_path / "b", "training=unified", "seed=3", f"training.init_from={init}")
        try:
            assert equal(weights_of(t), w1), init
        finally:
            t.close()
    assert fake_hub.calls[-1] == {"repo_id": "me/ckpts", "revision": "v2", "allow_patterns": ["export/final/*"]}
    assert "(hub; " in capsys.readouterr().err

    # a stage name: that stage's final for the experiment, an error when it is not there
    t = trainer(tmp_path / "a", "training=unified", "experiment=chain", "training.init_from=stage1_subln")
    try:
        assert equal(weights_of(t), w1)
    finally:
        t.close()
    with pytest.raises(FileNotFoundError, match="training.init_from=stage2_pretrain: no final checkpoint"):
        trainer(tmp_path / "a", "training=unified", "experiment=chain", "training.init_from=stage2_pretrain")


def test_init_from_errors_name_the_path_and_the_keys(tmp_path):
    stage1(tmp_path)
    final = tmp_path / "checkpoints/chain/stage1_subln_checkpoint/checkpoints/final"
    with pytest.raises(IncompatibleCheckpointError, match=r"checkpoint .*stage1_subln_checkpoint.* does not fit"):
        trainer(tmp_path, "training=stage2_pretrain", "experiment=chain", "model.config.intermediate_size=96")
    with pytest.raises(FileNotFoundError, match=r"training.init_from=.*/nope: .*/nope is not a checkpoint directory"):
        trainer(tmp_path, "training=unified", f"training.init_from={tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="no .complete marker"):
        trainer(tmp_path, "training=unified", f"training.init_from=file://{final}")


def test_a_resumed_run_takes_its_weights_from_the_resumed_checkpoint(tmp_path, capsys):
    w1 = stage1(tmp_path)
    common = ["training=stage2_pretrain", "experiment=chain", "training.save_every=1"]
    t = trainer(tmp_path, *common, "training.max_steps=2")
    try:
        t.fit()
        trained = {k: v.clone() for k, v in weights_of(t).items()}
    finally:
        t.close()
    assert not equal(trained, w1)
    t = trainer(tmp_path, *common, "training.resume.checkpoint_path=latest", "training.max_steps=3")
    try:
        assert t.step == 2 and equal(weights_of(t), trained)
    finally:
        t.close()
    t = trainer(tmp_path, *common, "training.resume.checkpoint_path=latest", f"training.init_from={tmp_path}/none")
    t.close()
    assert "is not used: the run resumes from" in capsys.readouterr().err


def _tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{uuid.uuid4().hex}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
def test_two_rank_fsdp_run_starts_from_a_remote_stage1_checkpoint(tmp_path):
    import subprocess
    import sys

    common = [*TINY, "experiment=chain", f"training.remote_dir=file://{tmp_path}/bucket"]
    env = {**os.environ, "WF_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "wrinklefree.train", f"output_dir={tmp_path / 'a'}", *common, "training=stage1_subln"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547", "-m",
         "wrinklefree.train", f"output_dir={tmp_path / 'b'}", *common, "training=stage2_pretrain",
         "distributed=fsdp_multi", "training.max_steps=0", "seed=7"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "starts from stage1_subln's final checkpoint file://" in two.stderr
    remote = tmp_path / "bucket/checkpoints/chain"
    stage1_final = remote / "stage1_subln_checkpoint/checkpoints/final"
    stage2_final = remote / "stage2_pretrain_checkpoint/checkpoints/final"
    assert (stage2_final / COMPLETE_MARKER).is_file() and (stage2_final / "trainer_rank1.pt").is_file()
    a, b = _tensors(stage1_final, tmp_path), _tensors(stage2_final, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the sharded load took every weight


def _data_position(out: Path, *overrides: str) -> dict:
    """Run fp_pretrain with ``overrides`` for experiment ``d``; returns its final checkpoint's data position."""
    t = trainer(out, "training=fp_pretrain", "experiment=d", "training.eval_every=0", *overrides)
    try:
        summary = t.fit()
    finally:
        t.close()
    return read_trainer_state(summary["checkpoint"])["data"]


def test_data_from_continues_where_another_run_stopped(tmp_path, capsys):
    whole = _data_position(tmp_path / "whole", "training.max_steps=5")
    first = _data_position(tmp_path / "a", "training.max_steps=3")
    final = tmp_path / "a/checkpoints/d/fp_pretrain_checkpoint/checkpoints/final"
    # 3 steps, then 2 more from where they stopped: where 5 steps in one run end
    rest = _data_position(tmp_path / "b", "training.max_steps=2", f"training.data_from={final}")
    assert first["step"] == 3 and rest == whole
    assert f"data: continuing after {final} (its run read 3 batches)" in capsys.readouterr().err
    # without it, a fresh run starts at the beginning
    assert _data_position(tmp_path / "c", "training.max_steps=3") == first


def test_data_from_init_follows_the_weights_and_bad_paths_are_named(tmp_path, capsys):
    stage1(tmp_path, "training.max_steps=2")
    t = trainer(tmp_path, "training=stage2_pretrain", "experiment=chain", "seed=1", "training.data_from=init")
    try:
        assert t.train_loader.step == 2  # stage 1's final checkpoint: its weights and its data position
    finally:
        t.close()
    # another seed shuffles the data otherwise: the position does not apply, and the error says why
    with pytest.raises(ValueError, match="does not fit this data config: .*seed is 42 here, 1 in the state"):
        trainer(tmp_path, "training=stage2_pretrain", "experiment=chain", "training.data_from=init")
    t = trainer(tmp_path, "training=stage2_pretrain", "experiment=none", "training.data_from=init")
    t.close()
    assert "data_from=init: the weights come from no checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="training.data_from: no complete checkpoint at"):
        trainer(tmp_path, "training=fp_pretrain", f"training.data_from={tmp_path / 'nowhere'}")
