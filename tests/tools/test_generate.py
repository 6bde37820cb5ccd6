"""Generation: the KV cache gives the same logits and tokens as re-running the whole sequence."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import build_model
from moetrain.tools.generate import generate, sample_next

pytestmark = pytest.mark.parity


def model(**router):
    m = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)
    for k, v in router.items():
        setattr(moe.router, k, v)
    return build_model(m, moe, vocab_size=64, max_seq_len=48, seed=0).eval()


def test_cached_logits_equal_full_recompute_position_by_position():
    net = model()
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = net(x).logits
        caches = net.new_kv_caches(2)
        prefill = net(x[:, :7], caches, 0).logits
        steps = [net(x[:, i : i + 1], caches, i).logits for i in range(7, 15)]
        chunk = net(x[:, 15:20], caches, 15).logits  # a multi-token chunk after the prefill
    torch.testing.assert_close(prefill, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:15], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 15:20], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 0.9, "top_k": 10, "top_p": 0.9, "seed": 3}])
@pytest.mark.parametrize("router", [{}, {"score_fn": "sigmoid", "num_groups": 2, "topk_groups": 1}])
def test_generation_with_cache_equals_without(kw, router):
    net = model(**router)
    prompt = torch.randint(0, 64, (2, 5))
    a = generate(net, prompt, 20, use_cache=True, **kw)
    b = generate(net, prompt, 20, use_cache=False, **kw)
    assert a.shape == (2, 25)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, temperature=0).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # probabilities ~ [0.032, 0.087, 0.237, 0.644]: top_p=0.7 keeps {3, 2}; top_p=0.5 keeps {3}
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {3}


def test_generation_stops_at_eos_and_rejects_too_long():
    net = model()
    prompt = torch.randint(0, 64, (1, 4))
    first = generate(net, prompt, 1, temperature=0.0)[0, -1].item()
    out = generate(net, prompt, 10, temperature=0.0, eos_id=first)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 48"):
        generate(net, prompt, 45)


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_mla_decode_flag_picks_the_path_and_both_print_the_same_text(tmp_path, monkeypatch, capsys, mode):
    """``moetrain-generate --mla-decode`` on an MLA checkpoint: absorbed (the default) runs the latent-space
    decode, expanded never does, and greedy text is the same. Catches the flag not reaching the model."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from moetrain.model.mla import MLA
    from moetrain.tools.export import import_hf
    from moetrain.tools.generate import main
    from tests.hf.test_deepseek import tiny_deepseek

    tiny_deepseek(3).save_pretrained(str(tmp_path / "hf"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    calls: list[int] = []
    inner = MLA.absorbed
    monkeypatch.setattr(MLA, "absorbed", lambda self, *a: calls.append(1) or inner(self, *a))
    args = [str(ckpt), "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]
    main(args)
    default_text, default_calls = capsys.readouterr().out, len(calls)
    main([*args, "--mla-decode", mode])
    assert capsys.readouterr().out == default_text
    assert default_calls > 0 and len(calls) == default_calls * (2 if mode == "absorbed" else 1)
