"""``moetrain-plan``: what a model costs on a cluster before you launch it.

    moetrain-plan model=small moe=deepseek_v2 parallel.ep=8 --nodes 2 --gpus-per-node 8 --gpu-mem-gb 80

From the same Hydra config as training, plus a cluster description, it reports:
total and active parameters (exact: the counting rules of the model itself),
training FLOPs per token, memory per GPU for weights, gradients and AdamW
states under the chosen EP / DP / ZeRO stage plus an activation estimate,
all-to-all bytes per step for unrestricted top-K and for device-limited top-M
routing, and an estimated step time.

All-to-all volume follows the dispatcher (``moetrain.parallel.all_to_all.AllToAllDispatcher``):
a token is sent once to each *other* EP rank holding one of its experts (its hidden
row, ``D x bytes``), with ``META_BYTES`` of metadata per (token, expert) assignment,
and one combined row per (token, rank) comes back. :func:`dispatch_bytes` computes
it exactly for a given routing (equal to the dispatcher's own counters);
:func:`expected_remote_ranks` gives the expectation for routing that spreads
tokens uniformly, which is the planning assumption.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from moetrain.config import TrainConfig, micro_batch_for, resolve_num_groups
from moetrain.errors import check_arg, guarded_main
from moetrain.model.mla import attention_score_flops, kv_numbers_per_token
from moetrain.model.transformer import active_per_token, build_model, total_and_active
from moetrain.moe.routing import topk_experts
from moetrain.parallel.all_to_all import META_BYTES
from moetrain.tools.plan_pipeline import Layout, RankMemory, memory_lines, model_parts, pipeline_memory


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    tflops: float = 989.0
    """Dense bf16 peak per GPU (TFLOP/s)."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation of the compute."""
    intra_bw_gbs: float = 450.0
    """Per-GPU bandwidth inside a node (GB/s, e.g. NVLink)."""
    inter_bw_gbs: float = 50.0
    """Per-GPU bandwidth between nodes (GB/s, e.g. 400 Gb/s InfiniBand)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def check_cluster(c: Cluster) -> Cluster:
    """Each flag in its range (one :class:`~moetrain.errors.ArgumentError` line): counts >= 1, sizes, speeds and
    bandwidths finite and > 0, the MFU a fraction in (0, 1]; ``--mfu 0`` divided by zero, ``nan`` printed nan."""
    for flag, value in (("--nodes", c.nodes), ("--gpus-per-node", c.gpus_per_node)):
        check_arg(flag, value, value >= 1, "must be >= 1")
    for flag, value in (
        ("--gpu-mem-gb", c.gpu_mem_gb),
        ("--tflops", c.tflops),
        ("--intra-bw-gbs", c.intra_bw_gbs),
        ("--inter-bw-gbs", c.inter_bw_gbs),
    ):
        check_arg(flag, value, math.isfinite(value) and value > 0, "must be a finite number > 0")
    check_arg("--mfu", c.mfu, 0 < c.mfu <= 1, "must be a fraction in (0, 1] (0.4 = 40% of --tflops)")
    return c


def param_counts(cfg: TrainConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts by part: :meth:`~moetrain.model.transformer.Transformer.param_counts` of the
    model the config builds, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe, vocab_size, cfg.data.seq_len, ep=cfg.parallel.ep)
    return model.param_counts()


def totals(counts: dict[str, int]) -> tuple[int, int]:
    """(total, active) parameters: active counts K of N routed experts."""
    return total_and_active(counts)


def flops_per_token(cfg: TrainConfig, vocab_size: int) -> float:
    """6 x active non-embedding parameters (LM head included) + the attention scores, 12 L D S for GQA
    (:func:`~moetrain.model.mla.attention_score_flops`, ``moetrain.train.flops``)."""
    counts = param_counts(cfg, vocab_size)
    active = totals(counts)[1] - counts["embedding"] + (counts["embedding"] if cfg.model.tie_embeddings else 0)
    return 6.0 * active + attention_score_flops(cfg.model, cfg.data.seq_len)


def kv_cache_bytes_per_token(cfg: TrainConfig, bytes_per_number: int = 2) -> int:
    """Generation cache bytes per token, all layers, bf16 by default: MLA's latent + RoPE key or GQA's K and V
    (:func:`~moetrain.model.mla.kv_numbers_per_token`)."""
    return kv_numbers_per_token(cfg.model) * cfg.model.n_layers * bytes_per_number


def expected_remote_ranks(num_experts: int, top_k: int, ep: int) -> float:
    """E[other EP ranks a token is sent to] when its K experts are a uniformly random K-subset.

    A given other rank holds N/ep experts; it is missed with probability
    C(N - N/ep, K) / C(N, K).
    """
    if ep <= 1:
        return 0.0
    per = num_experts // ep
    miss = math.comb(num_experts - per, top_k) / math.comb(num_experts, top_k)
    return (ep - 1) * (1.0 - miss)


def dispatch_bytes(
    expert_idx_TK: torch.Tensor, ep: int, ep_rank: int, num_experts: int, dim: int, itemsize: int
) -> dict[str, int]:
    """Exact forward all-to-all volume *sent by one rank* for the given routing of its tokens.

    ``rows_sent`` (token, other-rank) rows; ``bytes_sent`` as the dispatcher counts it:
    dispatch rows + metadata + the combine rows this rank returns, which for a
    symmetric step equal the rows it receives. Returns the send-side parts.
    """
    per = num_experts // ep
    dest_TK = expert_idx_TK // per
    T = dest_TK.shape[0]
    hit_TR = torch.zeros(T, ep, dtype=torch.bool).scatter_(1, dest_TK, True)
    hit_TR[:, ep_rank] = False
    rows = int(hit_TR.sum())
    assignments = int((dest_TK != ep_rank).sum())
    return {
        "rows_sent": rows,
        "assignments_sent": assignments,
        "send_bytes": rows * dim * itemsize + assignments * META_BYTES,
    }


def simulated_remote_ranks(cfg: TrainConfig, ep: int, samples: int = 4096, seed: int = 0) -> tuple[float, float]:
    """Mean (other ranks per token, remote assignments per token) of the configured selection rule on
    random affinities (so device-limited top-M is measured with the real routing code)."""
    moe, r = cfg.moe, cfg.moe.router
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(samples, moe.num_experts, generator=g)
    groups = resolve_num_groups(moe, ep)
    idx = topk_experts(scores, moe.top_k, groups, r.topk_groups, r.group_score)
    parts = [dispatch_bytes(idx, ep, rank, moe.num_experts, 1, 1) for rank in range(ep)]
    rows = sum(p["rows_sent"] for p in parts) / (ep * samples)
    assign = sum(p["assignments_sent"] for p in parts) / (ep * samples)
    return rows, assign


def memory_per_gpu(
    cfg: TrainConfig, vocab_size: int, world: int, zero: int, micro_batch: int, fsdp: bool = False
) -> dict[str, float]:
    """GB per GPU: bf16 weights and grads, fp32 master weights + AdamW moments (16 B/param mixed precision),
    sharded by ZeRO stage over the data-parallel replicas; activations estimated per micro-batch.

    Non-expert parameters are replicated over all W ranks (ZeRO shards their optimizer
    states over W); each rank holds N/ep experts, replicated over W/ep ranks. ``fsdp``
    (``parallel.fsdp``): the non-expert weights, grads and AdamW states are all sharded
    over the W data-parallel ranks, and the experts' over their W/ep expert-data-parallel
    ranks (the units FSDP gathers at a time are left out).
    Activations: Korthikanti et al. 2022 (eq. 2, no recomputation) for attention,
    s b D (34 + 5 a s / D) bytes per layer, with the MLP part scaled by the MoE
    layer's (K + shared) / dense width.
    """
    counts = param_counts(cfg, vocab_size)
    ep = cfg.parallel.ep
    dense = totals(counts)[0] - counts["routed_experts"] + counts["mtp"]  # MTP modules held whole (upper bound)
    expert = counts["routed_experts"] / ep
    edp = world // ep
    gb = 1e9

    def part(n: float, replicas: int) -> dict[str, float]:
        opt = 12.0 * n / (replicas if zero >= 1 else 1)
        grads = 2.0 * n / (replicas if zero >= 2 else 1)
        return {"weights": 2.0 * n, "grads": grads, "optimizer": opt}

    d, e = part(dense, world), part(expert, edp)
    if fsdp:  # every byte sharded over its data-parallel ranks (W, or W/ep for experts), whatever the ZeRO stage
        d = {"weights": 2.0 * dense / world, "grads": 2.0 * dense / world, "optimizer": 12.0 * dense / world}
        e = {"weights": 2.0 * expert / edp, "grads": 2.0 * expert / edp, "optimizer": 12.0 * expert / edp}
    m = cfg.model
    s, b, a = cfg.data.seq_len, micro_batch, m.n_heads
    act_layer = s * b * m.dim * (34 + 5 * a * s / m.dim)
    act = act_layer * m.n_layers + s * b * vocab_size * 4  # + fp32 logits
    return {
        "weights": (d["weights"] + e["weights"]) / gb,
        "grads": (d["grads"] + e["grads"]) / gb,
        "optimizer": (d["optimizer"] + e["optimizer"]) / gb,
        "activations": act / gb,
    }


def plan(cfg: TrainConfig, cluster: Cluster, vocab_size: int, zero: int = 1) -> dict[str, float]:
    """All the numbers of the report (per step: the global batch)."""
    counts = param_counts(cfg, vocab_size)
    total, active = totals(counts)
    fpt = flops_per_token(cfg, vocab_size)
    W = cluster.world
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    n_moe, D, ep, K = counts["moe_layers"], cfg.model.dim, cfg.parallel.ep, cfg.moe.top_k
    compute_s = fpt * tokens / (W * cluster.tflops * 1e12 * cluster.mfu)
    out: dict[str, float] = {
        "params_total": total,
        "params_active": active,
        "params_active_no_lookup": active_per_token(counts, cfg.model.tie_embeddings),
        "params_mtp": counts["mtp"],
        "flops_per_token": fpt,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "compute_s": compute_s,
    }

    def a2a(rows_per_token: float, assign_per_token: float) -> float:
        # forward: dispatch rows + metadata, combine rows back; backward moves the same rows again
        per_token = 2 * rows_per_token * D * 2 + assign_per_token * META_BYTES
        return 2 * per_token * tokens * n_moe

    topk_rows = expected_remote_ranks(cfg.moe.num_experts, K, ep)
    topk_assign = K * (ep - 1) / ep
    out["a2a_bytes_topk"] = a2a(topk_rows, topk_assign)
    if cfg.moe.router.topk_groups:
        rows, assign = simulated_remote_ranks(cfg, ep)
        out["a2a_bytes_topm"] = a2a(rows, assign)
        out["remote_ranks_topm"] = rows
    out["remote_ranks_topk"] = topk_rows
    intra = ep <= cluster.gpus_per_node
    bw = (cluster.intra_bw_gbs if intra else cluster.inter_bw_gbs) * 1e9
    key = "a2a_bytes_topm" if "a2a_bytes_topm" in out else "a2a_bytes_topk"
    out["a2a_s"] = out[key] / W / bw
    # gradient all-reduce (ring: 2 (n-1)/n of the bf16 grads), non-expert over W, expert over W/ep
    dense = total - counts["routed_experts"]
    ring = lambda n, g: 0.0 if g <= 1 else 2 * (g - 1) / g * 2 * n  # noqa: E731
    grad_bytes = ring(dense, W) + ring(counts["routed_experts"] / ep, W // ep)
    out["allreduce_s"] = grad_bytes / (cluster.inter_bw_gbs * 1e9 if cluster.nodes > 1 else cluster.intra_bw_gbs * 1e9)
    out["step_s"] = compute_s + out["a2a_s"] + out["allreduce_s"]
    micro = micro_batch_for(cfg.trainer, W)
    for k, v in memory_per_gpu(cfg, vocab_size, W, zero, micro).items():
        out[f"mem_{k}_gb"] = v
    out["mem_total_gb"] = sum(v for k, v in out.items() if k.startswith("mem_") and k.endswith("_gb"))
    for k, v in memory_per_gpu(cfg, vocab_size, W, zero, micro, fsdp=True).items():
        out[f"fsdp_mem_{k}_gb"] = v
    out["fsdp_mem_total_gb"] = sum(memory_per_gpu(cfg, vocab_size, W, zero, micro, fsdp=True).values())
    out.update(pipeline_plan(cfg, W))
    return out


def pipeline_plan(cfg: TrainConfig, world: int) -> dict[str, float]:
    """``parallel.pp``'s micro-batches per step (the accumulation of each of the ``world / pp`` pipelines) and
    the bubble fraction its schedule implies (:func:`~moetrain.parallel.pipeline.bubble_fraction`)."""
    from moetrain.config.pipeline_layout import stages_per_rank
    from moetrain.parallel.pipeline import bubble_fraction

    p = cfg.parallel
    dp = max(1, world // p.pp)  # the data-parallel ranks: one pipeline each
    m = max(1, cfg.trainer.global_batch_size // (micro_batch_for(cfg.trainer, dp, p.pp) * dp))
    v = stages_per_rank(p.pp_schedule, p.pp_virtual)
    return {"pp_microbatches": m, "pp_stages_per_rank": v, "pp_bubble": bubble_fraction(p.pp_schedule, p.pp, m, v)}


def pipeline_ranks(cfg: TrainConfig, vocab_size: int, world: int, zero: int, fsdp: bool = False) -> list[RankMemory]:
    """Each pipeline rank's memory per GPU (:mod:`moetrain.tools.plan_pipeline`), from the parameters of the
    model the config builds (on the meta device) and :func:`pipeline_plan`'s micro-batches."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe, vocab_size, cfg.data.seq_len, ep=cfg.parallel.ep)
    named = [(n, p.numel(), p.shape[0] if p.dim() else 1) for n, p in model.named_parameters()]
    dp = max(1, world // cfg.parallel.pp)
    layout = Layout(cfg.parallel.pp, cfg.parallel.ep, dp, zero, fsdp)
    m = int(pipeline_plan(cfg, world)["pp_microbatches"])
    parts = model_parts(named, cfg.moe.num_experts)
    return pipeline_memory(cfg, parts, vocab_size, layout, micro_batch_for(cfg.trainer, dp, cfg.parallel.pp), m)


def size(gb: float) -> str:
    """A size given in GB in the unit that fits it (``83.0 MB``, not ``0.1 GB``)."""
    for unit, scale in (("GB", 1.0), ("MB", 1e3), ("kB", 1e6)):
        if abs(gb) * scale >= 1:
            return f"{gb * scale:.1f} {unit}"
    return f"{gb * 1e9:.0f} B"


def duration(s: float) -> str:
    """Seconds in the unit that fits them (``0.744 ms``, ``2.31 s``)."""
    return f"{s:.3g} s" if s >= 1 or s == 0 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def count(n: float) -> str:
    """A parameter count in the unit that fits it (``6.86M``, ``1.204B``)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if unit != "B" else f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def report(cfg: TrainConfig, cluster: Cluster, vocab_size: int, zero: int) -> str:
    p = plan(cfg, cluster, vocab_size, zero)
    W, ep, pp = cluster.world, cfg.parallel.ep, cfg.parallel.pp
    fits = lambda total: "  ** does not fit **" if total > cluster.gpu_mem_gb else ""  # noqa: E731
    lines = [
        f"model: {count(p['params_total'])} parameters, {count(p['params_active_no_lookup'])} active per token "
        f"(LM head in, embedding lookup out: DeepSeek's count; {count(p['params_active'])} with the lookup)"
        + (f", + {count(p['params_mtp'])} in multi-token prediction" if p["params_mtp"] else "")
        + "; "
        f"{p['flops_per_token'] / 1e9:.3g} GFLOPs/token (training); "
        f"KV cache {p['kv_cache_bytes_per_token'] / 1024:.1f} KiB/token in bf16 ({cfg.model.attention})",
        f"cluster: {cluster.nodes} x {cluster.gpus_per_node} GPUs, {f'PP={pp}, ' if pp > 1 else ''}EP={ep}, "
        f"DP={W // pp}, ZeRO-{zero}; "
        f"{cfg.trainer.global_batch_size} x {cfg.data.seq_len} tokens/step",
        f"memory/GPU: weights {size(p['mem_weights_gb'])}, grads {size(p['mem_grads_gb'])}, "
        f"optimizer {size(p['mem_optimizer_gb'])}, activations ~{size(p['mem_activations_gb'])} "
        f"(micro-batch {micro_batch_for(cfg.trainer, W)}) = {size(p['mem_total_gb'])} of {cluster.gpu_mem_gb:.0f} GB"
        + fits(p["mem_total_gb"]),
        f"memory/GPU with FSDP (parallel.fsdp=true: weights, grads, optimizer / DP={W}, experts' / EDP={W // cfg.parallel.ep}): "
        f"weights {size(p['fsdp_mem_weights_gb'])}, grads {size(p['fsdp_mem_grads_gb'])}, "
        f"optimizer {size(p['fsdp_mem_optimizer_gb'])}, activations as above = {size(p['fsdp_mem_total_gb'])} of "
        f"{cluster.gpu_mem_gb:.0f} GB" + fits(p["fsdp_mem_total_gb"]),
        f"all-to-all/step (fwd+bwd, all ranks): top-K {size(p['a2a_bytes_topk'] / 1e9)} "
        f"({p['remote_ranks_topk']:.2f} other ranks/token)"
        + (
            f"; top-M {size(p['a2a_bytes_topm'] / 1e9)} ({p['remote_ranks_topm']:.2f} other ranks/token)"
            if "a2a_bytes_topm" in p
            else ""
        ),
        f"step time estimate: {duration(p['step_s'])} = compute {duration(p['compute_s'])} (MFU {cluster.mfu:.0%}) "
        f"+ all-to-all {duration(p['a2a_s'])} + grad all-reduce {duration(p['allreduce_s'])} (no overlap assumed)",
    ]
    if pp > 1:
        lines.append(
            f"pipeline: PP={pp}, {p['pp_stages_per_rank']:.0f} stage(s)/rank, {cfg.parallel.pp_schedule}, "
            f"{p['pp_microbatches']:.0f} micro-batches/step: bubble {p['pp_bubble']:.1%} of the step "
            "(equal stages; the memory lines and step time above are without PP; docs/pipeline.md)"
        )
        ranks, fsdp = (pipeline_ranks(cfg, vocab_size, W, zero, f) for f in (False, True))
        layout = Layout(pp, ep, max(1, W // pp), zero)
        lines += memory_lines(ranks, fsdp, layout, cluster.gpu_mem_gb, size)
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.config import validate, with_micro_batch
    from moetrain.data import build_tokenizer
    from moetrain.model.transformer import vocab_for
    from moetrain.train.cli import check_known_keys, config_dir

    p = argparse.ArgumentParser(description="Cost of a moetrain model on a cluster.", allow_abbrev=False)
    c = Cluster()
    p.add_argument("--nodes", type=int, default=c.nodes)
    p.add_argument("--gpus-per-node", type=int, default=c.gpus_per_node)
    p.add_argument("--gpu-mem-gb", type=float, default=c.gpu_mem_gb)
    p.add_argument("--tflops", type=float, default=c.tflops, help="dense bf16 peak per GPU")
    p.add_argument("--mfu", type=float, default=c.mfu)
    p.add_argument("--intra-bw-gbs", type=float, default=c.intra_bw_gbs)
    p.add_argument("--inter-bw-gbs", type=float, default=c.inter_bw_gbs)
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = p.parse_args(argv)
    cluster = check_cluster(Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.tflops, args.mfu,
                                    args.intra_bw_gbs, args.inter_bw_gbs))  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=args.overrides)
    check_known_keys(dcfg)
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainConfig)
    # micro_batch_size=None: each data-parallel rank's share, split for the pipeline under PP (config/world.py)
    cfg = with_micro_batch(cfg, cluster.world)
    validate(cfg, world_size=cluster.world, for_training=False)  # a ConfigError is one line (guarded_main)
    vocab = vocab_for(cfg.model, build_tokenizer(cfg.data.tokenizer).vocab_size)
    print(report(cfg, cluster, vocab, args.zero))


def main(argv: list[str] | None = None) -> None:
    """``moetrain-plan``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-plan", lambda: _main(argv))


if __name__ == "__main__":
    main()
