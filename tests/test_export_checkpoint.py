"""Export of trainer checkpoints: train the tiny model for a few steps, export its checkpoint with
``python -m wrinklefree.export`` and run the GGUF file in the C++ engine against the PyTorch model.

One run (module fixture) writes ``step_1`` (quantization warm-up at lam 0.5: refused), ``step_2`` and
``final`` (lam 1). The model keeps Llama's silu FFN, which llama.cpp's ``bitnet`` graph computes, so it
exports to tq2_0; hidden and intermediate sizes are 256, TQ2_0's block.
"""

import copy
import re
import shutil

import pytest
import torch
from test_engine import round_as_exported
from test_train import run

from wrinklefree import _C
from wrinklefree.export.__main__ import main
from wrinklefree.export.checkpoint import load_training_checkpoint
from wrinklefree.train.checkpoint import TOKENIZER_DIR, find_checkpoint, read_trainer_state

pytestmark = pytest.mark.slow  # about 15 s: a trainer run, then the export

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 17, 42, 0, 299] * 4
RUN = [
    "model.config.hidden_size=256",
    "model.config.intermediate_size=256",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "model.convert.activation=keep",  # silu: what llama.cpp's bitnet graph computes
    "model.config.hidden_act=silu",
    "training.quant_warmup.steps=2",
    "training.max_steps=3",
    "training.save_every=1",
    "training.keep_checkpoints=2",
    "experiment=export",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(trainer, stage directory)`` of a 3-step run; the trainer's model is the one that was trained."""
    with pytest.MonkeyPatch.context() as mp:  # the session's cache (conftest's fixture is per test)
        mp.setenv("WF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "wf-cache"))
        trainer, summary = run(tmp_path_factory.mktemp("train"), *RUN)
    final = find_checkpoint(summary["checkpoint"])
    assert final is not None and final.name == "final"
    return trainer, final.parent


def engine_logits(path, ids):
    engine = _C.Engine(str(path), 64, "f16")
    out = torch.empty((len(ids), engine.n_vocab))
    engine.eval(ids, out.data_ptr(), True)
    return engine, out


def test_checkpoint_records_config_and_tokenizer(trained):
    trainer, stage = trained
    state = read_trainer_state(stage / "final")
    assert state["config"]["model"]["config"]["hidden_size"] == 256
    assert state["config"]["training"]["quant_warmup"]["steps"] == 2
    assert (stage / "final" / TOKENIZER_DIR / "tokenizer.json").is_file()
    assert (stage / "step_1" / TOKENIZER_DIR / "tokenizer.json").is_file()  # every save, not only the last
    _, tokenizer = load_training_checkpoint(stage / "final")
    text = "def f(x):\n    return x  # ok"
    assert tokenizer(text)["input_ids"] == trainer.tokenizer(text)["input_ids"]
    assert tokenizer.mask_token_id == trainer.tokenizer.mask_token_id


@torch.no_grad()
def test_final_checkpoint_exports_and_runs_in_the_engine(trained, tmp_path, capsys):
    trainer, stage = trained
    model, _ = load_training_checkpoint(stage / "final")
    logits = model(torch.tensor([IDS])).logits[0]

    # The bitnet model computes what the trainer's model (fake-quantized at lam 1) computed.
    trainer.raw_model.eval()
    torch.testing.assert_close(logits, trainer.raw_model(torch.tensor([IDS])).logits[0], rtol=0, atol=1e-5)

    out = tmp_path / "m.gguf"
    main([str(stage / "final"), "--outfile", str(out), "--outtype", "tq2_0"])
    assert "wrote" in capsys.readouterr().out
    engine, got = engine_logits(out, IDS)
    assert engine.arch == "bitnet" and engine.n_vocab == model.config.vocab_size

    # Exactly the model's logits once its weights are rounded as the file holds them (f16 embedding,
    # fp16 weight scales); measured 4e-7: float summation order only.
    rounded = round_as_exported(copy.deepcopy(model), "tq2_0")
    torch.testing.assert_close(got, rounded(torch.tensor([IDS])).logits[0], rtol=0, atol=1e-5)

    # Against the unrounded model the fp16 rounding shows, amplified where an int8 activation code flips:
    # measured RMS 1.6% and max 7% of the logits' std. Bounds at about 3x and 2x those.
    diff, std = (got - logits).abs(), logits.std()
    assert diff.pow(2).mean().sqrt() < 0.05 * std and diff.max() < 0.15 * std
    top2 = logits.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff.max()  # a margin no difference of that size can overturn
    assert clear.sum() >= len(IDS) // 4
    assert torch.equal(got.argmax(-1)[clear], logits.argmax(-1)[clear])


def test_stage_directory_takes_final_then_newest_step(trained, tmp_path):
    _, stage = trained  # .../export/unified_checkpoint/checkpoints
    assert stage.name == "checkpoints" and stage.parent.name.endswith("_checkpoint")
    assert find_checkpoint(stage) == stage / "final"
    assert find_checkpoint(stage.parent) == stage / "final"  # the stage directory itself
    main([str(stage.parent), "--outfile", str(tmp_path / "f.gguf"), "--outtype", "tq2_0"])
    assert engine_logits(tmp_path / "f.gguf", IDS[:4])[0].arch == "bitnet"
    copied = tmp_path / "unified_checkpoint" / "checkpoints"
    shutil.copytree(stage, copied, ignore=shutil.ignore_patterns("final"))
    assert find_checkpoint(copied) == copied / "step_2"
    assert find_checkpoint(copied.parent) == copied / "step_2"
    main([str(copied.parent), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "tq1_0"])
    assert engine_logits(tmp_path / "m.gguf", IDS[:4])[0].arch == "bitnet"


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(1000)


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))  # the right size, unreadable


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
        (lambda d: _truncate(d / "__0_0.distcp"), r"__0_0.distcp is truncated \(1000 bytes, the model's weights need"),
        (lambda d: _zero(d / "__0_0.distcp"), r"its weights do not read \(UnpicklingError: "),
        (lambda d: (d / "trainer_rank0.pt").unlink(), "trainer_rank0.pt is missing"),
        (lambda d: _truncate(d / "trainer_rank0.pt"), r"trainer_rank0.pt does not read \("),
        (lambda d: _truncate(d / ".metadata"), r"\.metadata does not read \("),
        (lambda d: (d / TOKENIZER_DIR / "tokenizer.json").write_text("{"), "tokenizer: its tokenizer does not load"),
    ],
    ids=["distcp-missing", "distcp-truncated", "distcp-zeroed", "state-missing", "state-truncated", "metadata", "tok"],
)
def test_an_incomplete_or_corrupt_checkpoint_is_one_line(trained, tmp_path, capsys, damage, message):
    _, stage = trained
    broken = tmp_path / "final"
    shutil.copytree(stage / "final", broken)
    damage(broken)
    with pytest.raises(SystemExit) as e:
        main([str(broken), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "tq2_0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(rf"error: checkpoint {re.escape(str(broken))} is incomplete or corrupt: .*{message}", err), err
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_a_checkpoint_saved_during_the_warmup(trained, tmp_path, capsys):
    _, stage = trained
    with pytest.raises(ValueError, match=r"quantization warm-up \(lam = 0.5 < 1 at step 1 of 2\)"):
        load_training_checkpoint(stage / "step_1")
    with pytest.raises(SystemExit) as e:
        main([str(stage / "step_1"), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "tq2_0"])
    assert e.value.code == 2 and "warm-up" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_checkpoints_of_older_trainers(trained, tmp_path):
    _, stage = trained
    old = tmp_path / "final"
    shutil.copytree(stage / "final", old)
    shutil.rmtree(old / TOKENIZER_DIR)
    with pytest.raises(FileNotFoundError, match="has no tokenizer/ folder: it was saved by an older trainer"):
        load_training_checkpoint(old)
    state = torch.load(old / "trainer_rank0.pt", weights_only=False)
    del state["config"]
    torch.save(state, old / "trainer_rank0.pt")
    with pytest.raises(ValueError, match="does not record its config.*training.resume.checkpoint_path="):
        load_training_checkpoint(old)


def test_refuses_a_directory_of_neither_kind(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            main([str(path), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "tq2_0"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "neither a trainer checkpoint" in err and "bitnet checkpoint" in err


def test_refuses_a_model_the_bitnet_graphs_cannot_hold(tmp_path, capsys):
    _, summary = run(tmp_path, *RUN[:5], "model.convert.lrc_rank=4", "training.quant_warmup.steps=0",
                     "training.max_steps=1")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([summary["checkpoint"], "--outfile", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot be exported to GGUF: transformers' BitNet has no low-rank correction" in err
    assert not (tmp_path / "m.gguf").exists()
