"""The DeepSeek presets: model=deepseek_v2_lite / deepseek_v3 count the published parameters in moetrain-plan,
the tiny presets build, train a step and map onto transformers' DeepSeek models with the same parameter count."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import validate
from moetrain.config.compose import compose_without_hydra
from moetrain.tools.plan import Cluster, kv_cache_bytes_per_token, param_counts, report, totals

pytestmark = pytest.mark.unit


def deepseek_params(V, D, L, H, F, Fe, N, K, shared, first_k, dc, dq, dr, dn, dv):  # type: ignore[no-untyped-def]
    """(total, active) of a DeepSeek config.json's numbers, written out: embedding and LM head, the final norm,
    per layer two norms + MLA (eq. 9-19's matrices and latent norms), dense SwiGLU or router + experts."""
    q = D * H * (dn + dr) if dq is None else D * dq + dq + dq * H * (dn + dr)
    attn = 2 * D + q + D * (dc + dr) + dc + dc * H * (dn + dv) + H * dv * D
    expert = 3 * D * Fe
    base = 2 * V * D + D + L * attn + first_k * 3 * D * F + (L - first_k) * (N * D + shared * expert)
    return base + (L - first_k) * N * expert, base + (L - first_k) * K * expert


V2_236B = (102400, 5120, 60, 128, 12288, 1536, 160, 6, 2, 1, 512, 1536, 64, 128, 128)
"""DeepSeek-V2's config.json (236B total, 21B activated: arXiv 2405.04434, sec. 3.1.2); no preset, a third
data point for what "activated" counts."""

PUBLISHED = {
    # DeepSeek-V2 paper (arXiv 2405.04434) sec. 1 / appendix B: "15.7B total, 2.4B activated"
    "deepseek_v2_lite": (15.7e9, 2.4e9, (102400, 2048, 27, 16, 10944, 1408, 64, 6, 2, 1, 512, None, 64, 128, 128)),
    # DeepSeek-V3 paper (arXiv 2412.19437) abstract: "671B total, 37B activated" (the 14B MTP module apart)
    "deepseek_v3": (671e9, 37e9, (129280, 7168, 61, 128, 18432, 2048, 256, 8, 1, 3, 512, 1536, 64, 128, 128)),
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_planner_counts_the_published_deepseek_totals(preset):
    """Catches MLA parameters counted as GQA's, a missing latent norm or router, dense layers counted as MoE:
    the planner's total equals the config.json written out and the published total within 0.1%. The published
    active counts (two significant digits) are the count without the embedding lookup, which the report
    states as its active count (the LM head's matmul runs per token, the lookup does not)."""
    cfg = compose_without_hydra([f"model={preset}"])
    validate(cfg)
    pub_total, pub_active, shape = PUBLISHED[preset]
    counts = param_counts(cfg, cfg.model.vocab_size)
    total, active = totals(counts)
    assert (total, active) == deepseek_params(*shape)
    assert abs(total / pub_total - 1) < 1e-3, f"{total / 1e9:.3f}B vs {pub_total / 1e9}B"
    no_lookup = active - counts["embedding"]
    assert abs(no_lookup / pub_active - 1) < 0.025 and no_lookup < active  # 2.45B vs 2.4B; 36.6B vs 37B
    assert kv_cache_bytes_per_token(cfg) == (512 + 64) * cfg.model.n_layers * 2
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 256, 1  # one sequence per GPU of 256
    text = report(cfg, Cluster(nodes=32, gpus_per_node=8), cfg.model.vocab_size, 1)
    assert f"{total / 1e9:.3f}B parameters" in text and "KiB/token in bf16 (mla)" in text
    assert f"{no_lookup / 1e9:.3f}B active per token (LM head in, embedding lookup out" in text
    assert f"{active / 1e9:.3f}B with the lookup" in text


@pytest.mark.parametrize(
    ("shape", "published"),
    [(V2_236B, 21e9), (PUBLISHED["deepseek_v2_lite"][2], 2.4e9), (PUBLISHED["deepseek_v3"][2], 37e9)],
)
def test_activated_means_lm_head_in_embedding_lookup_out(shape, published):
    """DeepSeek's papers do not define "activated"; of the three readings (every active parameter; without
    the embedding lookup; without the embedding and the LM head), the planner's (without the lookup) is the
    closest to each published count: V2 20.85B -> 21B, V3 36.63B -> 37B (the 671B main model, the MTP
    module apart as in its total), V2-Lite 2.451B against 2.4B (the others: 2.661B, 2.242B). Catches a
    definition that fits the papers worse (the report states this one: test_planner_counts_the_published_...)."""
    active = deepseek_params(*shape)[1]
    lookup = shape[0] * shape[1]
    readings = {"all": active, "no_lookup": active - lookup, "no_embedding_or_head": active - 2 * lookup}
    assert min(readings, key=lambda k: abs(readings[k] - published)) == "no_lookup"
    assert abs(readings["no_lookup"] / published - 1) < 0.025


@pytest.mark.parametrize("preset", ["deepseek_v2_tiny", "deepseek_v3_tiny"])
def test_tiny_presets_train_a_step_and_map_onto_transformers(preset):
    """The CPU presets: MLA, first layer dense, the routing preset (V2 softmax / V3 sigmoid, scaling 2.5); one
    forward/backward is finite, and transformers' model of the same config has exactly the planner's count."""
    pytest.importorskip("transformers")
    from moetrain.hf.convert import hf_architecture, hf_class, hf_config
    from moetrain.model import build_model
    from moetrain.model.mtp import mtp_loss
    from moetrain.train.step import lm_loss

    cfg = compose_without_hydra([f"model={preset}", "data.seq_len=32"])
    validate(cfg)
    version = preset[len("deepseek_v")]
    assert cfg.model.attention == "mla" and cfg.model.first_k_dense == 1
    assert cfg.moe.router.score_fn == ("sigmoid" if version == "3" else "softmax")
    model = build_model(cfg.model, cfg.moe, 320, 32, seed=0)
    tokens = torch.randint(0, 320, (2, 33))
    out = model(tokens[:, :-1])
    assert len(out.mtp_logits) == (1 if version == "3" else 0)  # V3: one multi-token prediction module
    loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss + mtp_loss(out.mtp_logits, tokens[:, 1:], 0.3)[0]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    arch = hf_architecture(cfg, model)
    assert arch == f"deepseek_v{version}"
    with torch.device("meta"):
        hf = hf_class(arch)(hf_config(cfg, 320, arch))
    assert sum(p.numel() for p in hf.parameters()) == totals(param_counts(cfg, 320))[0]
