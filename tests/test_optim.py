"""Optimizers, LR schedules, ZClip and MuonClip (wrinklefree.train.optim / .muon; DESIGN.md section 5)."""

import copy
import math
import re
import sys

import pytest
import torch
import torch.distributed as dist
import transformers  # noqa: E402
from torch import nn

from wrinklefree.train.distributed import teardown
from wrinklefree.train.muon import MaxLogitTracker, find_attention_layers, newton_schulz, qk_clip
from wrinklefree.train.optim import (
    LRSchedule,
    MuonAdamW,
    ZClip,
    build_lr_scheduler,
    build_optimizer,
    split_params,
)

MUON_CFG = {"type": "muon", "lr": 0.02, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny; a second thread buys nothing and stalls badly when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(num_kv_heads=2, tie=False, bias=False, intermediate=128, vocab=300, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie,
        attention_bias=bias,
        max_position_embeddings=64,
    )
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config)


def lm_batch(batch=2, seq=16, vocab=300, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def median_tau(max_logits):
    """A tau that about half of the heads exceed, so that QK-clip acts."""
    return float(torch.cat(list(max_logits.values())).median())


def train_steps(model, opt, ids, steps, clip=False):
    """Plain LM steps on one batch; with clip also MaxLogitTracker + qk_clip. Returns the losses."""
    tracker = MaxLogitTracker(model) if clip else None
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tracker is not None:
            max_logits = tracker.pop()
            qk_clip(model, max_logits, tau=median_tau(max_logits))
        losses.append(loss.item())
    if tracker is not None:
        tracker.remove()
    return losses


def full_params(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------
# LR schedules


def lr_at(cfg, max_steps, steps):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_lr_scheduler(opt, cfg, max_steps)
    values = {}
    for step in range(max(steps) + 1):
        if step in steps:
            values[step] = opt.param_groups[0]["lr"] / 2.0
        opt.step()
        sched.step()
    return values


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 130: 0.1}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 28: 0.82, 55: 0.55, 100: 0.1, 130: 0.1}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 100: 1.0}),
        # decay over the last 20% (steps 80..100), min ratio 0.1
        ("wsd", {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 95: 0.325, 100: 0.1, 120: 0.1}),
    ],
)
def test_lr_schedule_values(kind, expected):
    cfg = {"type": kind, "warmup_steps": 10, "min_lr_ratio": 0.1, "decay_fraction": 0.2}
    got = lr_at(cfg, 100, set(expected))
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=1e-12), (kind, step)


def test_lr_schedule_cosine_shape_and_wsd_defaults():
    schedule = LRSchedule("cosine", max_steps=110, warmup_steps=10, min_lr_ratio=0.0)
    assert schedule(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    wsd = LRSchedule("wsd", max_steps=1000, warmup_steps=0)  # decay_fraction 0.2, min 0
    assert [wsd(s) for s in (0, 799, 800, 900, 1000)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_lr_schedule_errors_and_state_dict():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    with pytest.raises(ValueError, match="'step'"):
        build_lr_scheduler(opt, {"type": "step"}, 10)
    with pytest.raises(ValueError, match="warmup_ratio"):
        build_lr_scheduler(opt, {"type": "cosine", "warmup_ratio": 0.1}, 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_lr_scheduler(opt, {"type": "cosine", "min_lr_ratio": 2.0}, 10)

    cfg = {"type": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1}
    sched = build_lr_scheduler(opt, cfg, 50)
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 17 and state["lr_lambdas"] == [None]  # the shape comes from the config
    param2 = nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([param2], lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    sched2 = build_lr_scheduler(opt2, cfg, 50)
    sched2.load_state_dict(state)
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------------
# Optimizer construction


def test_adamw_param_groups():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    opt = build_optimizer(model, {"type": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.99], "eps": 1e-7})
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["eps"] == 1e-7
    assert not opt.param_groups[0]["fused"]  # CPU

    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in opt.param_groups[1]["params"])
    # 7 projections x 2 layers - the frozen one, + embedding + head
    assert len(decay) == 13 + 2 and "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert "model.layers.1.mlp.down_proj.weight" not in decay
    assert no_decay == sorted(
        [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
        + ["model.norm.weight"]
    )


@pytest.mark.parametrize("tie", [False, True])
def test_muon_param_split(tie):
    model = tiny_llama(tie=tie)
    groups = split_params(model, muon=True)
    muon = [n for n, _ in groups["muon"]]
    assert len(muon) == 14 and all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in muon)
    assert [n for n, _ in groups["decay"]] == ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"])
    assert len(groups["no_decay"]) == 5

    opt = build_optimizer(model, MUON_CFG)
    assert isinstance(opt, MuonAdamW)
    assert [(g["use_muon"], len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [
        (True, 14, 0.1),
        (False, 1 if tie else 2, 0.1),
        (False, 5, 0.0),
    ]


def test_optimizer_config_errors(monkeypatch):
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="momentun"):
        build_optimizer(model, {"type": "muon", "lr": 0.01, "momentun": 0.9})
    with pytest.raises(ValueError, match="'sgd'"):
        build_optimizer(model, {"type": "sgd", "lr": 0.01})
    with pytest.raises(ValueError, match="'lr'"):
        build_optimizer(model, {"type": "adamw"})
    with pytest.raises(ValueError, match="muon_lr_adjust"):
        build_optimizer(model, {"type": "muon", "lr": 0.01, "muon_lr_adjust": "spectral"})
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])
    # adamw8bit without bitsandbytes (None in sys.modules makes the import fail even where it is installed)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer(model, {"type": "adamw8bit", "lr": 1e-3})


# ---------------------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape", [(64, 128), (128, 48), (32, 200), (96, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_is_near_orthogonal(shape, dtype):
    gen = torch.Generator().manual_seed(3)
    rows, cols = shape
    if rows == cols:
        # A random square matrix has singular values near 0 that 5 steps cannot lift; use a known spectrum.
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
        s = torch.logspace(0, 1, rows)
        g = u @ torch.diag(s) @ v.T
    else:
        g = torch.randn(rows, cols, generator=gen)
    out = newton_schulz(g, dtype=dtype)
    assert out.dtype == dtype and out.shape == g.shape
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.65 and sv.max() < 1.25, (sv.min(), sv.max())
    # Same singular vectors as g: projecting onto g's polar factor gives a positive diagonal.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ out.float() @ vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-3)


def test_muon_update_rule():
    """One step from zero state: W <- W (1 - lr wd) - lr 0.2 sqrt(max dim) NS(G); AdamW groups match torch."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 48))
    b = nn.Parameter(torch.randn(32))
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = MuonAdamW(
        [{"params": [w], "use_muon": True}, {"params": [b], "weight_decay": 0.0}],
        lr=0.01,
        weight_decay=0.1,
        ns_dtype="float32",
    )
    ref_b = nn.Parameter(b0.clone())
    ref = torch.optim.AdamW([ref_b], lr=0.01, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    grads = [(torch.randn(32, 48), torch.randn(32)) for _ in range(3)]
    w.grad, b.grad, ref_b.grad = grads[0][0], grads[0][1], grads[0][1].clone()
    opt.step()
    ref.step()
    expected = w0 * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(48) * newton_schulz(grads[0][0], dtype=torch.float32)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    for gw, gb in grads[1:]:
        w.grad, b.grad, ref_b.grad = gw, gb, gb.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(b.detach(), ref_b.detach(), rtol=0, atol=0)
    assert set(opt.state[w]) == {"momentum_buffer"} and set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}


def test_muon_trains_and_state_dict_round_trips():
    model = tiny_llama()
    opt = build_optimizer(model, MUON_CFG)
    ids = lm_batch()
    losses = train_steps(model, opt, ids, 20)
    assert losses[-1] < 0.5 * losses[0], losses

    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, ids, 3)

    restored = tiny_llama(seed=123)
    restored.load_state_dict(saved_model)
    opt2 = build_optimizer(restored, MUON_CFG)
    opt2.load_state_dict(saved_opt)
    train_steps(restored, opt2, ids, 3)
    for (name, p), (_, q) in zip(model.named_parameters(), restored.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------------
# QK-clip


def reference_max_logits(model, ids, attention_mask=None):
    """Per-layer per-head max of q.k*scale over allowed pairs, recomputed with transformers' own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        batch, seq = ids.shape
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        result = {}
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(out.hidden_states[i])
            cos, sin = model.model.rotary_emb(h, torch.arange(seq)[None])
            q = attn.q_proj(h).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling
            result[i] = logits.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))
    return result


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_max_logit_tracker_matches_reference(attn):
    model = tiny_llama(attn=attn)
    ids = lm_batch(batch=2, seq=12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding in the second row
    tracker = MaxLogitTracker(model, query_chunk=5)
    for attention_mask in (None, mask):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask)
        got = tracker.pop()
        tracker.enabled = False  # the reference's own forward must not be recorded
        expected = reference_max_logits(model, ids, attention_mask)
        tracker.enabled = True
        for i in range(2):
            torch.testing.assert_close(got[i], expected[i], rtol=1e-5, atol=1e-5)
    assert all(torch.isinf(v).all() for v in tracker.pop().values())  # reset after pop
    tracker.remove()


def test_qk_clip_scales_the_right_rows():
    model = tiny_llama(num_kv_heads=4, bias=True)  # MHA: q and k rows of a head both get sqrt(gamma)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.rand_like(p))  # biases start at zero; make every row's scaling visible
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gammas = qk_clip(model, {0: torch.tensor([50.0, 400.0, 100.0, 200.0]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0])})
    assert gammas[0].tolist() == [1.0, 0.25, 1.0, 0.5] and gammas[1].tolist() == [1.0] * 4
    row_scale = torch.tensor([1.0, 0.5, 1.0, math.sqrt(0.5)]).repeat_interleave(16)
    for proj in ("q_proj", "k_proj"):
        for kind in ("weight", "bias"):
            name = f"model.layers.0.self_attn.{proj}.{kind}"
            scale = row_scale if kind == "bias" else row_scale[:, None]
            torch.testing.assert_close(dict(model.named_parameters())[name].detach(), before[name] * scale)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.0.self_attn.{p}.{k}" for p in ("q_proj", "k_proj") for k in ("weight", "bias")}

    gqa = tiny_llama(num_kv_heads=2)  # shared key heads: only query rows, by gamma
    before = {n: p.detach().clone() for n, p in gqa.named_parameters()}
    qk_clip(gqa, {1: torch.tensor([400.0, 50.0, 100.0, 125.0])}, tau=100.0)
    attn = gqa.model.layers[1].self_attn
    scale = torch.tensor([0.25, 1.0, 1.0, 0.8]).repeat_interleave(16)[:, None]
    torch.testing.assert_close(attn.q_proj.weight.detach(), before["model.layers.1.self_attn.q_proj.weight"] * scale)
    assert torch.equal(attn.k_proj.weight, before["model.layers.1.self_attn.k_proj.weight"])


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_qk_clip_caps_measured_logits(num_kv_heads):
    model = tiny_llama(num_kv_heads=num_kv_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
    ids = lm_batch(batch=2, seq=16)
    tracker = MaxLogitTracker(model)
    with torch.no_grad():
        model(input_ids=ids)
    first = tracker.pop()
    tau = float(torch.cat(list(first.values())).median())  # about half of the heads are over tau
    gammas = qk_clip(model, first, tau=tau)
    assert sum(int((g < 1).sum()) for g in gammas.values()) >= 3
    with torch.no_grad():
        model(input_ids=ids)
    second = tracker.pop()
    # Layer 0 sees the same input, so its logits are exactly capped; deeper layers see changed inputs.
    torch.testing.assert_close(second[0], torch.clamp(first[0], max=tau), rtol=1e-4, atol=1e-4)
    assert set(find_attention_layers(model)) == {0, 1}
    tracker.remove()


# ---------------------------------------------------------------------------------------------------
# ZClip


def set_grad_norm(param, norm, seed):
    g = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
    param.grad = g * (norm / g.norm())
    return param.grad.clone()


def test_zclip_warmup_normal_and_spike():
    param = nn.Parameter(torch.zeros(50))
    zclip = ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=5)
    warm = [1.0, 1.2, 0.8, 5.0, 1.0]  # a spike during warm-up is recorded, not clipped
    for i, norm in enumerate(warm):
        g = set_grad_norm(param, norm, i)
        assert zclip.step([param]).item() == pytest.approx(norm, rel=1e-5)
        assert torch.equal(param.grad, g)
    t = torch.tensor(warm)
    assert zclip.mean.item() == pytest.approx(t.mean().item(), rel=1e-5)
    assert zclip.var.item() == pytest.approx(t.var(unbiased=False).item(), rel=1e-5)

    mean, var = zclip.mean.item(), zclip.var.item()
    g = set_grad_norm(param, 1.5, 10)  # z ~ 0.18: untouched, statistics move
    zclip.step(param)
    assert torch.equal(param.grad, g)
    mean, var = 0.9 * mean + 0.1 * 1.5, 0.9 * var + 0.1 * (1.5 - (0.9 * mean + 0.1 * 1.5)) ** 2
    assert zclip.mean.item() == pytest.approx(mean, rel=1e-5) and zclip.var.item() == pytest.approx(var, rel=1e-5)

    g = set_grad_norm(param, 40.0, 11)
    sigma = math.sqrt(var)
    z = (40.0 - mean) / (sigma + 1e-6)
    target = mean + 2.5**2 * sigma / z
    assert zclip.step(param).item() == pytest.approx(40.0, rel=1e-5)
    assert param.grad.norm().item() == pytest.approx(target, rel=1e-5)
    torch.testing.assert_close(param.grad, g * (target / 40.0))
    assert zclip.mean.item() == pytest.approx(0.9 * mean + 0.1 * target, rel=1e-5)  # stats take the clipped norm


def test_zclip_max_grad_norm_in_warmup_and_module_input():
    model = nn.Linear(8, 4)
    zclip = ZClip(warmup_steps=3, max_grad_norm=0.5)
    model(torch.randn(16, 8)).pow(2).sum().backward()
    total = zclip.step(model)
    assert total > 0.5
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert clipped.item() == pytest.approx(0.5, rel=1e-5)


def test_zclip_state_dict_round_trip():
    a, b = nn.Parameter(torch.zeros(20)), nn.Parameter(torch.zeros(20))
    z1 = ZClip(warmup_steps=4)
    for i, norm in enumerate([1.0, 1.1, 0.9]):  # stop mid-warm-up
        set_grad_norm(a, norm, i)
        z1.step(a)
    z2 = ZClip()
    z2.load_state_dict(z1.state_dict())
    for i, norm in enumerate([1.05, 1.0, 30.0, 1.0]):
        set_grad_norm(a, norm, 100 + i)
        set_grad_norm(b, norm, 100 + i)
        assert z1.step(a).item() == z2.step(b).item()
        assert torch.equal(a.grad, b.grad)
    assert z1.state_dict()["num_steps"] == z2.state_dict()["num_steps"] == 7
    assert z1.mean.item() == z2.mean.item() and z1.var.item() == z2.var.item()


# ---------------------------------------------------------------------------------------------------
# FSDP2


def fsdp_wrap(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def test_muon_fsdp2_single_process_matches_plain(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        plain = tiny_llama()
        sharded = fsdp_wrap(copy.deepcopy(plain))
        opts = [build_optimizer(m, MUON_CFG) for m in (plain, sharded)]
        zclips = [ZClip(warmup_steps=2) for _ in range(2)]
        trackers = [MaxLogitTracker(m) for m in (plain, sharded)]
        ids = lm_batch()
        for _ in range(3):
            norms, logits = [], []
            for model, opt, zclip, tracker in zip((plain, sharded), opts, zclips, trackers, strict=True):
                model(input_ids=ids, labels=ids).loss.backward()
                norms.append(zclip.step(model))
                opt.step()
                opt.zero_grad()
                logits.append(tracker.pop())
            torch.testing.assert_close(norms[0], norms[1])
            for i in logits[0]:
                torch.testing.assert_close(logits[0][i], logits[1][i])
            tau = median_tau(logits[0])
            gammas = [
                qk_clip(model, max_logits, tau) for model, max_logits in zip((plain, sharded), logits, strict=True)
            ]
            assert any(bool((g < 1).any()) for g in gammas[1].values())
        expected, got = full_params(plain), full_params(sharded)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        # The sharded state is DTensor-valued and goes through torch.distributed.checkpoint's helpers.
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        from torch.distributed.tensor import DTensor

        saved = get_optimizer_state_dict(sharded, opts[1])
        momentum = saved["state"]["model.layers.0.self_attn.q_proj.weight"]["momentum_buffer"]
        assert isinstance(momentum, DTensor)
        fresh = build_optimizer(sharded, MUON_CFG)
        set_optimizer_state_dict(sharded, fresh, saved)
        for before, after in zip(opts[1].state.values(), fresh.state.values(), strict=True):
            assert before.keys() == after.keys()
            for key in before:
                assert torch.equal(
                    torch.as_tensor(after[key].full_tensor() if key != "step" else after[key]),
                    torch.as_tensor(before[key].full_tensor() if key != "step" else before[key]),
                )
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(rank, world_size, init_file, out_file, cfgs, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    finished = False
    try:
        results = []
        for cfg in cfgs:
            model = fsdp_wrap(tiny_llama(intermediate=129, vocab=301))
            opt = build_optimizer(model, cfg)
            ids = lm_batch(batch=4, vocab=301).chunk(world_size)[rank]
            train_steps(model, opt, ids, steps, clip=True)
            results.append(full_params(model))  # full_tensor() is a collective: every rank calls it
        if rank == 0:
            torch.save(results, out_file)
        finished = True
    finally:
        teardown(clean=finished)


@pytest.mark.slow
def test_muon_fsdp2_two_processes_match_single_process(tmp_path):
    """Two ranks, each with half the batch, uneven shards (129 and 301 rows), QK-clip across ranks.

    Newton-Schulz in float32 must match the single-process run tightly. In bf16 it turns reduction-order
    noise (~1e-7) into ~1e-3 differences (measured: a 1e-6 gradient perturbation moves o_proj by 4e-3 in
    4 steps, sharded or not), so there the check is against the size of the total update: a wrong shard
    would be off by O(1).
    """
    import torch.multiprocessing as mp

    cfgs = [dict(MUON_CFG, ns_dtype="float32"), dict(MUON_CFG, ns_dtype="bfloat16")]
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "pg"), str(out_file), cfgs, 4), nprocs=2, join=True)
    results = torch.load(out_file)

    for cfg, result in zip(cfgs, results, strict=True):
        model = tiny_llama(intermediate=129, vocab=301)
        start = full_params(model)
        opt = build_optimizer(model, cfg)
        train_steps(model, opt, lm_batch(batch=4, vocab=301), 4, clip=True)
        for name, expected in full_params(model).items():
            if cfg["ns_dtype"] == "float32":
                torch.testing.assert_close(result[name], expected, rtol=1e-5, atol=1e-5)
            else:
                moved = (expected - start[name]).norm()
                assert (result[name] - expected).norm() < 0.1 * moved, name


def test_adamw8bit_runs_on_cpu_with_8bit_moments_and_tracks_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 1))
    twin = copy.deepcopy(model)
    cfg = {"lr": 3e-3, "weight_decay": 0.1}
    opt8 = build_optimizer(model, {"type": "adamw8bit", **cfg})
    opt32 = build_optimizer(twin, {"type": "adamw", **cfg})
    x = torch.randn(128, 64)
    y = x[:, :1] - 0.5 * x[:, 1:2]
    losses = []
    for _ in range(60):
        for m, opt in ((model, opt8), (twin, opt32)):
            loss = (m(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    first = model[0].weight
    assert opt8.state[first]["state1"].dtype == torch.uint8  # 64 x 96 >= 4096 values: 8-bit moments
    assert opt8.state[first]["state2"].dtype == torch.uint8
    assert losses[-1] < 0.1 * losses[0]  # the fp32 AdamW twin's curve, trained alongside
    final8 = (model(x) - y).square().mean().item()
    assert final8 < 0.1 * losses[0] and abs(final8 - losses[-1]) < 0.5 * losses[-1] + 1e-3
    w8, w32 = model[0].weight.detach(), twin[0].weight.detach()
    assert (w8 - w32).norm() < 0.1 * w32.norm()  # the same steps, up to the moments' quantization


def test_adamw8bit_on_cpu_needs_bitsandbytes_0_50(monkeypatch):
    # bitsandbytes' CPU backend has the 8-bit optimizers from 0.50; an older one is refused, naming both
    import bitsandbytes

    model = nn.Linear(8, 8)
    for old in ("0.49.2", "0.45.0.dev0"):
        monkeypatch.setattr(bitsandbytes, "__version__", old)
        with pytest.raises(ValueError, match=rf">= 0\.50 .*found {re.escape(old)}"):
            build_optimizer(model, {"type": "adamw8bit", "lr": 1e-3})
