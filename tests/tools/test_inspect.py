"""The routing inspector reports the model's own routing; the inspect and generate CLIs run on a checkpoint."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import build_model
from moetrain.tools.inspector import html_page, routes_for, terminal_table, token_pieces
from tests.conftest import tiny_train_config


def small_model(vocab: int = 64, **router):
    m = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)
    for k, v in router.items():
        setattr(moe.router, k, v)
    return build_model(m, moe, vocab_size=vocab, max_seq_len=32, seed=0).eval()


@pytest.mark.unit
@pytest.mark.parametrize("router", [{}, {"eval_capacity_factor": 0.5}, {"num_groups": 2, "topk_groups": 1}])
def test_inspector_routes_equal_the_layers_own_dispatch(router):
    model = small_model(**router)
    x = torch.randint(0, 64, (2, 16))
    routes = routes_for(model, x)
    with torch.no_grad():
        stats = model(x).moe_stats
    assert list(routes) == sorted(stats)
    for i, r in routes.items():
        # the experts the inspector reports are exactly the assignments the layer dispatched
        counts = torch.bincount(torch.tensor([e for es in r.experts for e in es]), minlength=4).float()
        torch.testing.assert_close(counts, stats[i].load_N)
        assert all(w == sorted(w, reverse=True) for w in r.weights)  # top expert first
        if not router:
            assert all(len(es) == 2 and len(set(es)) == 2 for es in r.experts)


@pytest.mark.unit
def test_inspector_routes_match_router_on_captured_hidden_states():
    model = small_model()
    x = torch.randint(0, 64, (1, 12))
    layer_inputs = {}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: layer_inputs.__setitem__(i, args[0].detach()))
        for i, layer in model.moe_layers().items()
    ]
    routes = routes_for(model, x)
    for h in handles:
        h.remove()
    for i, layer in model.moe_layers().items():
        with torch.no_grad():
            s = (layer_inputs[i].reshape(-1, 32) @ layer.router.weight.T).softmax(-1)
        top = s.topk(2).indices.tolist()
        assert routes[i].experts == top


@pytest.mark.unit
def test_table_and_html_show_every_token():
    from moetrain.data import ByteTokenizer

    tok = ByteTokenizer()
    ids = [int(t) for t in tok.encode("def f(x):\n  return x")]
    model = small_model(vocab=320)
    routes = routes_for(model, torch.tensor([ids]))
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == "def f(x):\n  return x"
    table = terminal_table(pieces, routes)
    assert len(table.splitlines()) == 2 + len(ids)
    page = html_page(pieces, routes, "t")
    assert page.count('class="tok"') >= len(ids) * len(routes)
    assert "<script" not in page and "http" not in page  # self-contained


@pytest.mark.e2e
def test_inspect_and_generate_cli_on_a_trained_checkpoint(tmp_path, capsys):
    from moetrain.tools.generate import main as generate_main
    from moetrain.tools.inspector import main as inspect_main
    from moetrain.train.trainer import Trainer

    cfg = tiny_train_config(tmp_path, max_steps=3)
    Trainer(cfg, tmp_path / "run").fit()
    inspect_main([str(tmp_path / "run"), "--text", "import os", "--html", str(tmp_path / "r.html"), "--corpus", "2"])
    out = capsys.readouterr().out
    assert "layer 1" in out and "e" in out and "per-expert statistics over 2 validation sequences" in out
    assert (tmp_path / "r.html").read_text().count("<h2>layer") == 1
    generate_main([str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"])
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.unit
def test_expert_styles_are_distinct_for_64_experts():
    from moetrain.tools.inspector import LayerRoutes, expert_style, html_page

    styles = [expert_style(e) for e in range(64)]
    assert len(set(styles)) == 64
    page = html_page(["a", "b"], {1: LayerRoutes(experts=[[63], [15]], weights=[[1.0], [1.0]])}, "t")
    assert expert_style(63) in page and expert_style(15) in page and expert_style(31) in page  # legend too
