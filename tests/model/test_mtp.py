"""Multi-token prediction (moetrain.model.mtp): DeepSeek-V3 eq. 21-25 transcribed for D = 1 and 2, lambda = 0
leaves the main model's loss and gradients bitwise unchanged, evaluation and export leave the modules out, and
the trainer logs train/mtp_loss_<k> under gradient accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import build_model
from moetrain.model.mtp import mtp_loss
from moetrain.train.step import lm_loss

pytestmark = pytest.mark.parity

V, S = 64, 12


def mtp_model(depth: int, lam: float = 0.3, **kw):  # type: ignore[no-untyped-def]
    m = ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_hidden_size=48, first_k_dense=1, mtp_depth=depth)
    m.mtp_lambda = lam
    for k, v in kw.items():
        setattr(m, k, v)
    return build_model(m, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16), V, 32, seed=0)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def transcription(model, tokens: torch.Tensor, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Eq. 21-25 with explicit indices: t_1..t_T are the inputs and the last target (1-based as in the paper);
    depth k at position i combines h_i^{k-1} with Emb(t_{i+k}) and predicts t_{i+k+1}."""
    captured = {}
    hook = model.norm.register_forward_hook(lambda mod, args, out: captured.setdefault("h", args[0]))
    model(tokens[:, :-1])
    hook.remove()
    h = captured["h"]  # h^0: the main model's last hidden state, before its final norm
    B, T = tokens.shape[0], tokens.shape[1] - 1
    eps = model.cfg.norm_eps
    cos, sin = model.rope_cos, model.rope_sin
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        rows = []
        for i in range(T - k):  # 0-based position i: token t_{i+k} is tokens[:, i + k]
            e = model.embed.weight[tokens[:, i + k]]
            rows.append(torch.cat([rms(h[:, i], module.hnorm.weight, eps), rms(e, module.enorm.weight, eps)], -1))
        h_in = torch.stack(rows, 1) @ module.proj.weight.T  # eq. 21
        h, _ = module.block(h_in, cos=cos, sin=sin, token_ids_BS=tokens[:, k:-1])  # eq. 22
        logp = torch.log_softmax(rms(h, module.norm.weight, eps) @ model.lm_head.weight.T, -1)  # eq. 23
        nll = sum(-logp[b, i, tokens[b, i + k + 1]] for b in range(B) for i in range(T - k))
        losses.append(nll / (B * T))  # eq. 24: 1/T over the sequence (and the mean over the batch)
    return lam / len(losses) * sum(losses), losses  # eq. 25


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_equals_a_transcription_of_eq_21_to_25(depth):
    """Catches an off-by-one in which token's embedding is combined or which token is predicted, the
    concatenation order, the norms (hnorm and enorm swapped: their weights are drawn apart here, at init both
    are ones), the 1/T normalisation or lambda / D."""
    model = mtp_model(depth, lam=0.3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.mtp:
            for norm in (module.hnorm, module.enorm, module.norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
    tokens = torch.randint(0, V, (2, S + 1), generator=torch.Generator().manual_seed(1))
    out = model(tokens[:, :-1])
    assert [lg.shape[1] for lg in out.mtp_logits] == [S - k for k in range(1, depth + 1)]
    total, per_depth = mtp_loss(out.mtp_logits, tokens[:, 1:], out.mtp_lambda)
    ref_total, ref = transcription(model, tokens, 0.3)
    for got, want in zip(per_depth, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert math.isclose(total.item(), 0.3 / depth * sum(x.item() for x in per_depth), rel_tol=1e-6)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_lambda_zero_leaves_the_main_loss_and_gradients_bitwise_unchanged(attention):
    """Catches MTP gradients (its cross-entropy or its MoE block's balance losses) leaking into the main model
    when lambda = 0; the main model's initialisation is the same with and without MTP modules."""
    tokens = torch.randint(0, V, (4, S + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for depth in (0, 2):
        model = mtp_model(depth, lam=0.0, attention=attention)
        out = model(tokens[:, :-1])
        main = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        mtp, per_depth = mtp_loss(out.mtp_logits, tokens[:, 1:], out.mtp_lambda)
        (main + mtp if per_depth else main).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("mtp.")}
        results.append((main.detach(), grads, len(per_depth)))
    (ref_loss, ref, n0), (loss, grads, n2) = results
    assert (n0, n2) == (0, 2)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref[name]), name


@pytest.mark.parametrize("wrap", ["checkpoint", "compile"])
def test_mtp_blocks_under_activation_checkpointing_and_regional_compile_equal_the_plain_run(wrap):
    """trainer.activation_checkpointing / trainer.compile wrap the MTP modules' blocks (MoE, MLA) as the main
    ones: the MTP block's attention runs twice per step (recomputed) or is a compiled region, and the loss and
    every gradient equal the plain run. Catches the MTP blocks left out of either (they would run unwrapped:
    the recompute count or the compiled flag fails) or wrapped so that they compute something else."""
    from moetrain.model.apply import apply_activation_checkpointing, apply_compile

    tokens = torch.randint(0, V, (2, S + 1), generator=torch.Generator().manual_seed(4))
    results = []
    for wrapped in (False, True):
        model = mtp_model(2, lam=0.3, attention="mla", n_kv_heads=None)
        if wrapped:
            apply_activation_checkpointing(model) if wrap == "checkpoint" else apply_compile(model, "aot_eager")
        calls: list[int] = []
        model.mtp[1].block.attn.register_forward_hook(lambda *a, _calls=calls: _calls.append(1))
        out = model(tokens[:, :-1])
        loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss + mtp_loss(out.mtp_logits, tokens[:, 1:], 0.3)[0]
        names = [n for n, _ in model.named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
        results.append((loss.detach(), grads, len(calls)))
        if wrapped and wrap == "compile":
            assert all(m.block.attn._compiled_call_impl is not None for m in model.mtp)
    (ref_loss, ref, ref_calls), (loss, grads, calls) = results
    assert calls == (2 if wrap == "checkpoint" else ref_calls) and ref_calls == 1
    tol = 0.0 if wrap == "checkpoint" else 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert any(name.startswith("mtp.1.block.ffn.experts") for name in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=tol * 10, atol=tol / 10, msg=name)


def test_mtp_is_training_only_and_left_out_of_the_transformers_export():
    """Evaluation and generation do not run the modules; the DeepSeek-V3 export has no MTP tensors while the
    moetrain state keeps them; the planner counts them apart from the totals (DeepSeek-V3's 671B)."""
    pytest.importorskip("transformers")
    from moetrain.config import TrainConfig
    from moetrain.hf.convert import hf_architecture, hf_class, hf_config, to_hf_state

    model = mtp_model(1, attention="mla", n_kv_heads=None, tie_embeddings=False)
    assert model.eval()(torch.randint(0, V, (1, 8))).mtp_logits == []
    cfg = TrainConfig(model=model.cfg, moe=model.moe_cfg)
    r = cfg.moe.router
    r.score_fn, r.norm_topk_prob, r.bias_update_rate = "sigmoid", True, 1e-3
    cfg.moe.top_k = 2
    assert hf_architecture(cfg, model) == "deepseek_v3"
    state = to_hf_state(model, "deepseek_v3", set())
    hf = hf_class("deepseek_v3")(hf_config(cfg, V, "deepseek_v3"))
    assert set(state) == set(hf.state_dict())
    assert any(k.startswith("mtp.0.block.") for k in model.state_dict())
    counts = model.param_counts()
    assert counts["mtp"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - counts["mtp"]


@pytest.mark.e2e
def test_trainer_logs_mtp_loss_per_depth_with_gradient_accumulation(tmp_path):
    """train/mtp_loss_1 and _2 reach the metrics file, finite, with 2 micro-batches per step."""
    from moetrain.train.trainer import Trainer
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(tmp_path, max_steps=2, micro_batch_size=4)
    cfg.model.mtp_depth = 2
    cfg.checkpoint.enabled = False
    t = Trainer(cfg, tmp_path / "run")
    t.fit()
    t.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert math.isfinite(r["train/mtp_loss_1"]) and math.isfinite(r["train/mtp_loss_2"])
