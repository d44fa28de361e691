"""The distillation losses (DESIGN.md section 5) against values worked by hand, and the Distillation objective."""

import math

import pytest
import torch
import transformers

from wrinklefree import convert
from wrinklefree.objectives import (
    Distillation,
    ObjectiveManager,
    attention_relation_loss,
    hidden_state_loss,
    logits_kd_loss,
)


def test_logits_kd_is_tau_squared_kl_of_the_softened_distributions():
    # tau = 2: the teacher's (0, 2 ln 3) / 2 softens to (1/4, 3/4); the student's (0, 0) to (1/2, 1/2)
    teacher = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert logits_kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    # KL(teacher || student), not the other way round
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert reverse != pytest.approx(kl, rel=1e-3)


def test_logits_kd_averages_over_the_tokens_the_mask_keeps():
    teacher = torch.tensor([[[0.0, 2 * math.log(3.0)], [5.0, -5.0]]])
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    kl0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    masked = logits_kd_loss(student, teacher, temperature=2.0, mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(4 * kl0, rel=1e-6)
    assert logits_kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def _row_kl(p_row, q_row):
    return sum(p * math.log(p / q) for p, q in zip(p_row, q_row, strict=True))


def test_attention_relation_kl_of_softmaxed_cosine_matrices():
    # one relation head of width 2, two tokens. Teacher: orthogonal unit vectors, A A^T = I, so each row is
    # softmax(1, 0) = (e, 1) / (e + 1). Student: both tokens along the same direction (lengths differ: the
    # L2 normalisation removes them), A A^T = all ones, rows (1/2, 1/2).
    teacher = torch.tensor([[[3.0, 0.0], [0.0, 0.5]]])
    student = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    expected = _row_kl(p, [0.5, 0.5])  # the same for both rows, by symmetry
    got = attention_relation_loss([student], [teacher], relation_heads=1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the mean over states: Q, K, V where only one differs
    three = attention_relation_loss([student, teacher, teacher], [teacher] * 3, relation_heads=1)
    assert three.item() == pytest.approx(expected / 3, rel=1e-6)


def test_attention_relation_splits_states_into_heads_and_masks_tokens():
    # width 4 into 2 heads of width 2: head 0 is the case above, head 1 agrees between the models
    teacher = torch.tensor([[[3.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0]]])
    student = torch.tensor([[[1.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]]])
    e = math.e
    head0 = _row_kl([e / (e + 1), 1 / (e + 1)], [0.5, 0.5])
    got = attention_relation_loss([student], [teacher], relation_heads=2)
    assert got.item() == pytest.approx(head0 / 2, rel=1e-6)
    # masking the second token leaves a 1x1 relation: probability 1 on both sides, KL 0
    masked = attention_relation_loss([student], [teacher], relation_heads=2, mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="relation_heads=3"):
        attention_relation_loss([student], [teacher], relation_heads=3)


def test_hidden_state_losses():
    t = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # |t| = 5 and 1
    s = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
    # mse: ((0 + 16) / 2 + (1 + 1) / 2) / 2 tokens
    assert hidden_state_loss([s], [t], "mse").item() == pytest.approx((8 + 1) / 2)
    # nmse: (16 / 25 + 2 / 1) / 2
    assert hidden_state_loss([s], [t], "nmse").item() == pytest.approx((16 / 25 + 2) / 2)
    # cosine: 1 - (9 / (5 * 3)), 1 - 0
    assert hidden_state_loss([s], [t], "cosine").item() == pytest.approx(((1 - 9 / 15) + 1) / 2)
    # averaged over layers; the mask drops tokens
    assert hidden_state_loss([s, t], [t, t], "nmse").item() == pytest.approx((16 / 25 + 2) / 4)
    masked = hidden_state_loss([s], [t], "nmse", mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(16 / 25)
    with pytest.raises(ValueError, match="same number of layers"):
        hidden_state_loss([s], [t, t])
    with pytest.raises(ValueError, match="kind must be one of"):
        hidden_state_loss([s], [t], "l1")


def tiny_pair(seed=0, layers=2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="relu2",
        tie_word_embeddings=True,
    )
    teacher = transformers.LlamaForCausalLM(config)
    student = transformers.LlamaForCausalLM(config)
    student.load_state_dict(teacher.state_dict())
    convert(student)
    return teacher, student


def test_distillation_shares_one_forward_and_the_teacher_gets_no_gradient():
    teacher, student = tiny_pair()
    distill = Distillation(teacher, student, temperature=5.0, relation_heads=4)
    ids = torch.randint(0, 97, (2, 9))
    calls = {"student": 0, "teacher": 0}
    student.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    manager = ObjectiveManager({"distill": distill}, {"ce": 1.0, "logits_kd": 1.0, "attention_kd": 10.0, "hidden": 1.0})
    loss, parts = manager(student, {"input_ids": ids}, step=0)
    assert calls == {"student": 1, "teacher": 1}
    assert set(parts) == {"ce", "logits_kd", "attention_kd", "hidden"}
    total = parts["ce"] + parts["logits_kd"] + 10 * parts["attention_kd"] + parts["hidden"]
    torch.testing.assert_close(loss.detach(), total)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and all(torch.isfinite(g).all() for g in student_grads)
    # the teacher is not part of the objective's modules (not saved, moved or trained with it)
    assert not any(True for _ in manager.parameters())


def test_distillation_parts_match_the_plain_functions():
    teacher, student = tiny_pair(seed=1)
    distill = Distillation(teacher, student, temperature=3.0, relation_layer=0, relation_heads=2, hidden_loss="mse")
    ids = torch.randint(0, 97, (3, 7))
    parts = distill(student, {"input_ids": ids}, ["logits_kd", "attention_kd", "hidden"])
    captured = {}

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out)

    for who, model in (("s", student), ("t", teacher)):
        attn = model.model.layers[0].self_attn
        handles = [getattr(attn, f"{x}_proj").register_forward_hook(keep(who + x)) for x in "qkv"]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        captured[who + "logits"], captured[who + "hidden"] = out.logits, out.hidden_states[1:]
        for h in handles:
            h.remove()
    torch.testing.assert_close(parts["logits_kd"], logits_kd_loss(captured["slogits"], captured["tlogits"], 3.0))
    expect_ad = attention_relation_loss([captured["s" + x] for x in "qkv"], [captured["t" + x] for x in "qkv"], 2)
    torch.testing.assert_close(parts["attention_kd"], expect_ad)
    torch.testing.assert_close(parts["hidden"], hidden_state_loss(captured["shidden"], captured["thidden"], "mse"))


def test_an_unconverted_copy_of_the_teacher_has_zero_distillation_loss():
    teacher, _ = tiny_pair(seed=2)
    student = transformers.LlamaForCausalLM(teacher.config)
    student.load_state_dict(teacher.state_dict())
    parts = Distillation(teacher, student, relation_heads=4)(
        student, {"input_ids": torch.randint(0, 97, (2, 6))}, ["logits_kd", "attention_kd", "hidden"]
    )
    for name, value in parts.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


def test_distillation_errors_name_the_problem():
    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match="layer=5 is out of range"):
        Distillation(teacher, student, relation_layer=5)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(teacher, student, temperature=0)
    distill = Distillation(teacher, student, relation_heads=4)
    with pytest.raises(ValueError, match="unknown losses"):
        distill(student, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, ["kl"])
    deeper, _ = tiny_pair(layers=3)
    ids = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="same number of layers"):
        Distillation(deeper, student, relation_heads=4)(student, ids, ["hidden"])
