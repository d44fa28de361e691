"""CE, DLM and the ObjectiveManager."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wrinklefree.objectives import CrossEntropy, DiffusionLM, ObjectiveManager

VOCAB, MASK, EOS = 50, 49, 0


class Bigram(nn.Module):
    """logits[b, i] depend on token i only: a model whose outputs are easy to write down."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB))

    def forward(self, input_ids):
        return self.table[input_ids]


def batch(seed=0, b=3, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 1, (b, s), generator=g)
    ids[:, 5] = EOS
    return {"input_ids": ids}


def test_ce_is_shifted_next_token_cross_entropy():
    model, data = Bigram(), batch()
    ids = data["input_ids"]
    expected = F.cross_entropy(model.table[ids[:, :-1]].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(CrossEntropy()(model, data), expected)


def test_ce_matches_transformers_own_loss():
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    data = batch()
    torch.testing.assert_close(CrossEntropy()(model, data), model(**data, labels=data["input_ids"]).loss)


def test_dlm_masks_never_special_tokens_and_follows_t():
    dlm = DiffusionLM(MASK, never_mask=[EOS], mask_prob=0.5)
    ids = torch.randint(1, VOCAB - 1, (64, 200))
    ids[:, ::7] = EOS
    mask, t = dlm.sample_mask(ids)
    assert not mask[ids == EOS].any()
    assert torch.equal(t, torch.full((64,), 0.5))
    share = mask[ids != EOS].float().mean().item()
    assert abs(share - 0.5) < 0.01
    dlm_u = DiffusionLM(MASK, never_mask=[EOS], eps=0.1)
    _, t = dlm_u.sample_mask(ids)
    assert (t >= 0.1).all() and (t <= 1.0).all() and t.std() > 0.1


def test_dlm_loss_is_masked_ce_weighted_by_one_over_t():
    model, data = Bigram(), batch(1)
    ids = data["input_ids"]
    dlm = DiffusionLM(MASK, never_mask=[EOS])
    torch.manual_seed(123)
    loss = dlm(model, data)
    torch.manual_seed(123)
    mask, t = dlm.sample_mask(ids)
    noisy = torch.where(mask, torch.full_like(ids, MASK), ids)
    ce = F.cross_entropy(model.table[noisy[:, :-1]].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    expected = (ce.view(3, -1) * mask[:, 1:] / t[:, None]).sum() / ids[:, 1:].numel()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.table.grad.abs().sum() > 0


def test_dlm_complementary_covers_every_token_once():
    dlm = DiffusionLM(MASK, never_mask=[EOS], complementary=True)
    loss = dlm(Bigram(), batch(2))
    assert loss.isfinite() and loss > 0


def test_manager_weights_and_curriculum():
    model, data = Bigram(), batch()
    ce, dlm = CrossEntropy(), DiffusionLM(MASK, never_mask=[EOS], mask_prob=0.3)
    mgr = ObjectiveManager(
        {"ce": ce, "dlm": dlm},
        {"ce": 1.0, "dlm": 0.5},
        [{"until": 0.25, "weights": {"dlm": 0.0}}, {"until": 1.0, "weights": {"ce": 0.8}}],
        max_steps=100,
    )
    assert mgr.weights_at(0) == {"ce": 1.0, "dlm": 0.0} and mgr.weights_at(24) == {"ce": 1.0, "dlm": 0.0}
    assert mgr.weights_at(25) == {"ce": 0.8, "dlm": 0.5} and mgr.weights_at(500) == {"ce": 0.8, "dlm": 0.5}
    total, parts = mgr(model, data, step=0)
    assert set(parts) == {"ce"} and torch.equal(total, ce(model, data))
    torch.manual_seed(7)
    total, parts = mgr(model, data, step=50)
    torch.manual_seed(7)
    expected = 0.8 * ce(model, data) + 0.5 * dlm(model, data)
    assert set(parts) == {"ce", "dlm"}
    torch.testing.assert_close(total, expected)


def test_manager_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown objectives"):
        ObjectiveManager({"ce": CrossEntropy()}, {"kd": 1.0})
    with pytest.raises(ValueError, match="until"):
        ObjectiveManager({"ce": CrossEntropy()}, {"ce": 1.0}, [{"until": 1.5, "weights": {}}])
    with pytest.raises(ValueError, match="unknown keys"):
        ObjectiveManager({"ce": CrossEntropy()}, {"ce": 1.0}, [{"until": 0.5, "weights": {}, "when": 3}])
    mgr = ObjectiveManager({"ce": CrossEntropy()}, {"ce": 0.0})
    with pytest.raises(ValueError, match="weight 0"):
        mgr(Bigram(), batch(), 0)
    with pytest.raises(ValueError, match="mask_prob"):
        DiffusionLM(MASK, mask_prob=0.0)
