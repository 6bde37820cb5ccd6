"""The bugs ``scripts/mutation_check.py`` plants, one per entry, and the tests that must catch each.

An edit is ``(file, old text, new text)``; the old text (the anchor) must occur exactly once in the file
as the earlier edits of the same mutation left it. ``fast``: its tests are unit tests of a few seconds
(``--sample`` draws from these for CI).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    package: str
    bug: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]
    """Test files or node ids (``file::test``) run against the mutated copy."""
    fast: bool = False


def _m(name: str, package: str, bug: str, edits: list[tuple[str, str, str]], *tests: str, fast: bool = False):
    return Mutation(name, package, bug, tuple(edits), tests, fast)


DATA_SCALE = "tests/data/test_shards_and_mixtures.py::"
FSDP = "tests/parallel/test_fsdp.py::"

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ moe: balance losses, routing, capacity
    _m(
        "balance_detached_p",
        "moe",
        "P_i detached in every f*P balance loss (values unchanged, no gradient to the router)",
        [("moetrain/moe/layer.py", "p_N = s_TN.mean(0)", "p_N = s_TN.detach().mean(0)")],
        "tests/moe/test_balance_grads.py",
        fast=True,
    ),
    _m(
        "seq_loss_over_tokens",
        "moe",
        "sequence-wise loss computed over all tokens of the micro-batch instead of averaged per sequence",
        [
            (
                "moetrain/moe/balance.py",
                "    _, S, N = norm_scores_BSN.shape\n"
                "    f_BN = counts_BN.detach().float() * N / (top_k * S)\n"
                "    return (f_BN * norm_scores_BSN.mean(dim=1)).sum(dim=-1).mean()",
                "    B, S, N = norm_scores_BSN.shape\n"
                "    f_N = counts_BN.detach().float().sum(0) * N / (top_k * S * B)\n"
                "    return (f_N * norm_scores_BSN.mean(dim=(0, 1))).sum()",
            )
        ],
        "tests/moe/test_balance_grads.py",
        fast=True,
    ),
    _m(
        "global_scope_ignored",
        "moe",
        "balance.scope=global: the layer keeps its micro-batch selection counts instead of the step's",
        [
            (
                "moetrain/moe/layer.py",
                'counts_f = g["expert"] if g is not None else sel_counts_N',
                "counts_f = sel_counts_N",
            )
        ],
        "tests/moe/test_balance_grads.py",
        fast=True,
    ),
    _m(
        "sigmoid_p_unnormalised",
        "moe",
        "sigmoid affinities enter P_i without the per-token normalisation (DeepSeek-V3 eq. 19)",
        [("moetrain/moe/layer.py", "s_TN = s_TN / s_TN.sum(dim=-1, keepdim=True)", "s_TN = s_TN * 1.0")],
        "tests/moe/test_balance_grads.py",
        fast=True,
    ),
    _m(
        "comm_loss_uses_k_for_m",
        "moe",
        "communication loss divides by K instead of the device limit M",
        [("moetrain/moe/losses.py", "m = x.topk_groups or min(x.top_k, x.num_groups)", "m = x.top_k")],
        "tests/moe/test_balance_grads.py",
        fast=True,
    ),
    _m(
        "capacity_off_by_one",
        "moe",
        "per-expert capacity keeps C + 1 assignments",
        [
            (
                "moetrain/moe/capacity.py",
                "return keep_TK & (rank_A < cap).view_as(keep_TK)",
                "return keep_TK & (rank_A <= cap).view_as(keep_TK)",
            )
        ],
        "tests/moe/test_capacity_reference.py",
        fast=True,
    ),
    _m(
        "drop_by_position",
        "moe",
        "capacity drops by position (first come, first kept) instead of by affinity",
        [
            (
                "moetrain/moe/capacity.py",
                "p_A = priority_TK.detach().reshape(-1).double().masked_fill(",
                "p_A = torch.zeros(priority_TK.numel(), dtype=torch.float64).masked_fill(",
            )
        ],
        "tests/moe/test_capacity_reference.py",
        fast=True,
    ),
    _m(
        "device_drop_keeps_lowest",
        "moe",
        "device-level dropping keeps the lowest-affinity assignments of an over-budget device",
        [
            (
                "moetrain/moe/capacity.py",
                "kept_TK = capacity_keep(group_TK, priority_TK, keep_TK, num_groups, int(budget))",
                "kept_TK = capacity_keep(group_TK, -priority_TK, keep_TK, num_groups, int(budget))",
            )
        ],
        "tests/moe/test_capacity_reference.py",
    ),
    _m(
        "group_score_sum_not_max",
        "moe",
        "DeepSeek-V2 device-limited routing scores a group by the sum of its affinities, not its best one",
        [("moetrain/moe/routing.py", "group_TG = grouped_TGE.amax(dim=-1)", "group_TG = grouped_TGE.sum(dim=-1)")],
        "tests/moe/test_checkpointed_and_grouped_routing.py",
    ),
    _m(
        "ac_rng_not_preserved",
        "moe",
        "activation checkpointing recomputes noisy routing with fresh noise",
        [("moetrain/model/apply.py", "preserve_rng_state=True", "preserve_rng_state=False")],
        "tests/moe/test_checkpointed_and_grouped_routing.py",
    ),
    # ------------------------------------------------------------------ parallel: EP sync, FSDP, buckets, overlap
    _m(
        "ep_grad_scale",
        "parallel",
        "expert gradients averaged over the expert-data-parallel group (1/EDP) instead of 1/W",
        [
            (
                "moetrain/parallel/data_parallel.py",
                "experts.set_gradient_divide_factor(float(pc.world_size))",
                "experts.set_gradient_divide_factor(float(pc.edp_size))",
            )
        ],
        "tests/parallel/test_ep_skew.py",
    ),
    _m(
        "clip_skips_experts",
        "parallel",
        "clipping scales the dense gradients only (the norm is right, expert gradients stay unclipped)",
        [
            (
                "moetrain/parallel/clip.py",
                "for g in once + world + ep:",
                "for g in once + world:",
            )
        ],
        "tests/parallel/test_ep_skew.py",
    ),
    _m(
        "fsdp_reduce_in_bf16",
        "parallel",
        "FSDP gradients reduced in bf16 under the bf16 policy (reduce_dtype = param_dtype)",
        [
            (
                "moetrain/parallel/data_parallel.py",
                "MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)",
                "MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype, cast_forward_inputs=False)",
            )
        ],
        FSDP + "test_fsdp_bf16_policy_gathers_bf16_keeps_the_router_fp32_and_reduces_in_fp32",
    ),
    _m(
        "fsdp_expert_divide_by_ep",
        "parallel",
        "FSDP's expert units divide their EDP sum by the EP size instead of W (a sum at EP=1)",
        [
            (
                "moetrain/parallel/data_parallel.py",
                "experts.set_gradient_divide_factor(float(pc.world_size))",
                "experts.set_gradient_divide_factor(float(pc.ep_size))",
            )
        ],
        FSDP + "test_fsdp_steps_equal_the_replicated_run[2-ep1]",
    ),
    _m(
        "reduce_every_micro_batch",
        "parallel",
        "every micro-batch's backward reduces the gradients, not only the step's last (the reduction repeated)",
        [
            (
                "moetrain/train/native.py",
                "set_micro_batch_sync(self.model, last=i == n - 1)",
                "set_micro_batch_sync(self.model, last=True)",
            )
        ],
        "tests/parallel/test_data_parallel.py::test_only_the_last_micro_batch_reduces_and_the_reduction_overlaps_the_backward",
    ),
    _m(
        "overlap_shared_detached",
        "parallel",
        "the shared experts overlapped with the all-to-alls get no gradient (their output detached)",
        [
            (
                "moetrain/parallel/all_to_all.py",
                "return Combined(y_TD, d.comm, d.keep_A, side_TD)",
                "return Combined(y_TD, d.comm, d.keep_A, side_TD.detach())",
            )
        ],
        "tests/parallel/test_overlap.py::test_overlapped_shared_experts_give_bitwise_the_sequential_output_and_gradients",
    ),
    _m(
        "meta_init_drops_doc_eos",
        "parallel",
        "the meta-device build drops doc_eos, so the trainer never masks documents",
        [
            (
                "moetrain/parallel/meta_init.py",
                "num_groups, doc_eos, skip_init=True)",
                "num_groups, None, skip_init=True)",
            )
        ],
        DATA_SCALE + "test_trainer_masks_documents_when_doc_mask_is_on",
    ),
    # ------------------------------------------------------------------ train: checkpoints, guards, console, metrics
    _m(
        "reshard_swapped_expert_moments",
        "train",
        "AdamW moments of a rank's local experts restored in reverse expert order",
        [
            (
                "moetrain/train/checkpoint/entries.py",
                "for i in range(rows.shape[0])]\n                    src = torch.stack(parts)",
                "for i in reversed(range(rows.shape[0]))]\n                    src = torch.stack(parts)",
            )
        ],
        "tests/train/checkpoint/test_reshard_continue.py",
    ),
    _m(
        "reshard_local_expert_index",
        "train",
        "expert rows keyed in reverse local order in checkpoints (same-EP resume still exact)",
        [
            (
                "moetrain/train/checkpoint/entries.py",
                'out[f"{prefix}.{lay.offset + first + i}{suffix}"] = rows[i]',
                'out[f"{prefix}.{lay.offset + first + i}{suffix}"] = rows[rows.shape[0] - 1 - i]',
            )
        ],
        "tests/train/checkpoint/test_reshard_continue.py",
    ),
    _m(
        "checkpoint_verifies_share_0",
        "train",
        "every rank verifies checksum share 0 on load (rank 1's files never checked)",
        [
            (
                "moetrain/train/checkpoint/manager.py",
                "verify_checkpoint(path, meta, self.pc.rank, self.pc.world_size,",
                "verify_checkpoint(path, meta, 0, self.pc.world_size,",
            )
        ],
        "tests/train/checkpoint/test_fsdp_checkpoint.py::test_bad_checkpoint_into_fsdp_fails_with_one_line_and_touches_nothing",
    ),
    _m(
        "loss_free_load_not_all_reduced",
        "train",
        "loss-free bias updated from this rank's load instead of the all-reduced one",
        [
            (
                "moetrain/train/trainer.py",
                "reduced = self.module.reduce_metrics(self.forward_backward(global_batch))",
                "rec = self.forward_backward(global_batch)\n        reduced = self.module.reduce_metrics(rec)",
            ),
            (
                "moetrain/train/trainer.py",
                "layer.router.update_bias(layer_load(reduced, i))",
                'layer.router.update_bias(rec.values[f"moe/layer_{i}/load"])',
            ),
        ],
        "tests/train/checkpoint/test_reshard_continue.py",
    ),
    _m(
        "deterministic_flag_noop",
        "train",
        "trainer.deterministic=true leaves deterministic algorithms off",
        [
            (
                "moetrain/train/trainer.py",
                "torch.use_deterministic_algorithms(True)",
                "torch.use_deterministic_algorithms(False)",
            )
        ],
        "tests/train/test_determinism.py",
    ),
    _m(
        "guard_misses_inf",
        "train",
        "the non-finite guard tests ~isnan instead of isfinite (an inf loss or norm passes)",
        [
            (
                "moetrain/train/guards.py",
                "flags = torch.stack([torch.isfinite(t.detach().float()).all() for t in parts.values()])",
                "flags = torch.stack([(~torch.isnan(t.detach().float())).all() for t in parts.values()])",
            )
        ],
        "tests/train/test_guards_and_refusals.py::test_the_guard_stops_on_inf_as_on_nan",
        fast=True,
    ),
    _m(
        "console_log_truncated_on_resume",
        "train",
        'train.log opened with mode "w" (a resume erases the earlier lines)',
        [
            (
                "moetrain/train/console.py",
                'logging.FileHandler(run_dir / "train.log", encoding="utf-8")',
                'logging.FileHandler(run_dir / "train.log", mode="w", encoding="utf-8")',
            )
        ],
        "tests/train/test_console.py::test_train_log_keeps_the_lines_of_the_run_it_resumes",
    ),
    _m(
        "devices_per_token_summed",
        "train",
        "devices_per_token reduced as a sum across micro-batches and ranks instead of a mean",
        [
            (
                "moetrain/train/moe_metrics.py",
                '                rec.record(f"{p}/{name}", value, "mean")\n        if s.comm',
                '                rec.record(f"{p}/{name}", value, "sum" if name == "devices_per_token" else "mean")\n'
                "        if s.comm",
            )
        ],
        "tests/train/test_metrics.py::test_per_token_means_stay_means_over_micro_batches",
        fast=True,
    ),
    # ------------------------------------------------------------------ data: shards, mixtures, document masking
    _m(
        "shard_index_offset_lost",
        "data",
        "a shard's document index loses its running token offset (a shard spanning two batches)",
        [
            (
                "moetrain/data/shards.py",
                "self.ends.append(ends[first : stop_doc + 1] - start + self.tokens)",
                "self.ends.append(ends[first : stop_doc + 1] - start)",
            )
        ],
        DATA_SCALE + "test_shards_hold_whole_documents_and_the_index_marks_them",
        fast=True,
    ),
    _m(
        "mixture_metrics_last_batch",
        "data",
        "realised mixture proportions taken from the last batch only",
        [
            (
                "moetrain/data/sampling.py",
                "        choice = mixture_choices(self.weights, self.counts, self.global_batch_size)\n",
                "        choice = mixture_choices(self.weights, self.counts, self.global_batch_size)\n"
                "        self.last_counts = np.bincount(choice, minlength=len(self.names))\n",
            ),
            (
                "moetrain/data/sampling.py",
                "        total = max(int(self.counts.sum()), 1)\n"
                '        return {f"data/source/{n}": float(c) / total for n, c in zip(self.names, self.counts)}',
                "        total = max(int(self.last_counts.sum()), 1)\n"
                '        return {f"data/source/{n}": float(c) / total for n, c in zip(self.names, self.last_counts)}',
            ),
        ],
        DATA_SCALE + "test_mixture_metrics_are_the_cumulative_proportions_not_the_last_batchs",
        fast=True,
    ),
    _m(
        "doc_ids_eos_starts_document",
        "data",
        "document masking puts each EOS in the next document instead of the one it ends",
        [
            (
                "moetrain/model/layers.py",
                "return torch.cumsum(is_eos, dim=1) - is_eos",
                "return torch.cumsum(is_eos, dim=1)",
            )
        ],
        DATA_SCALE + "test_document_ids_start_after_each_eos",
        fast=True,
    ),
    # ------------------------------------------------------------------ hf: transformers export
    _m(
        "hf_export_fixed_rope_theta",
        "hf",
        "HF export writes a fixed rope_theta (10000) instead of model.rope_theta",
        [
            (
                "moetrain/hf/mapping.py",
                '"rope_theta": m.rope_theta,\n        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},',
                '"rope_theta": 10000.0,\n        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},',
            )
        ],
        "tests/hf/test_transformers_interop.py::test_qwen_moe_imports_and_exports_with_equal_logits",
    ),
    _m(
        "hf_export_fixed_norm_eps",
        "hf",
        "HF export writes transformers' default rms_norm_eps instead of model.norm_eps",
        [("moetrain/hf/mapping.py", '"rms_norm_eps": m.norm_eps,', '"rms_norm_eps": 1e-6,')],
        "tests/hf/test_transformers_interop.py::test_qwen_moe_imports_and_exports_with_equal_logits",
    ),
    # ------------------------------------------------------------------ model: MLA, MTP (issue 30)
    _m(
        "mla_rope_key_unrotated",
        "model",
        "MLA: the decoupled RoPE key k^R is never rotated (eq. 14's RoPE applied to the query only)",
        [("moetrain/model/mla.py", "apply_rope(k_rope, cos, sin)", "k_rope")],
        "tests/model/test_mla.py::test_mla_equals_a_transcription_of_eq_9_to_19_in_values_and_gradients",
        fast=True,
    ),
    _m(
        "mla_rope_on_the_nope_part",
        "model",
        "MLA: the query's RoPE part and its no-RoPE part swapped (RoPE lands on the q^C dimensions)",
        [("moetrain/model/mla.py", "torch.cat([q_nope, q_rope], dim=-1)", "torch.cat([q_rope, q_nope], dim=-1)")],
        "tests/model/test_mla.py::test_mla_equals_a_transcription_of_eq_9_to_19_in_values_and_gradients",
        fast=True,
    ),
    _m(
        "mla_scale_without_mscale",
        "model",
        "MLA under YaRN: the softmax scale left at 1/sqrt(d_h + d_h^R), without DeepSeek-V3's mscale^2",
        [("moetrain/model/mla.py", "mscale_all_dim) ** 2", "mscale_all_dim) ** 0")],
        "tests/model/test_mla.py::test_yarn_scale_and_tables_follow_deepseek_v3",
        fast=True,
    ),
    _m(
        "mla_scale_nope_dim_only",
        "model",
        "MLA: the softmax scale 1/sqrt(d_h) of the no-RoPE width alone instead of 1/sqrt(d_h + d_h^R)",
        [
            (
                "moetrain/model/mla.py",
                "(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5",
                "cfg.qk_nope_head_dim ** -0.5",
            )
        ],
        "tests/model/test_mla.py::test_mla_equals_a_transcription_of_eq_9_to_19_in_values_and_gradients",
        fast=True,
    ),
    _m(
        "mtp_embedding_off_by_one",
        "model",
        "MTP depth k embeds t_{i+k-1} (the main model's own input) instead of the next token t_{i+k}",
        [("moetrain/model/mtp.py", "model.embed(tokens_BS[:, k:])", "model.embed(tokens_BS[:, k - 1 : S - 1])")],
        "tests/model/test_mtp.py",
        fast=True,
    ),
    _m(
        "mtp_norms_swapped",
        "model",
        "MTP: the hidden state normalised by the embedding's RMSNorm and the embedding by the hidden state's",
        [
            (
                "moetrain/model/mtp.py",
                "module.hnorm(h[:, :n]), module.enorm(emb)",
                "module.enorm(h[:, :n]), module.hnorm(emb)",
            )
        ],
        "tests/model/test_mtp.py",
        fast=True,
    ),
    _m(
        "mtp_concat_order",
        "model",
        "MTP: [Emb; h] concatenated instead of eq. 21's [RMSNorm(h); RMSNorm(Emb)] (the projection's halves swapped)",
        [
            (
                "moetrain/model/mtp.py",
                "[module.hnorm(h[:, :n]), module.enorm(emb)]",
                "[module.enorm(emb), module.hnorm(h[:, :n])]",
            )
        ],
        "tests/model/test_mtp.py",
        fast=True,
    ),
    _m(
        "mtp_lambda_not_per_depth_mean",
        "model",
        "MTP loss lambda x sum_k L^k instead of eq. 25's lambda / D x sum_k L^k (equal at depth 1 only)",
        [("moetrain/model/mtp.py", "lam / len(per_depth) *", "lam *")],
        "tests/model/test_mtp.py",
        fast=True,
    ),
    # ------------------------------------------------------------------ parallel: pipeline stages (issue 32)
    _m(
        "pp_aux_scale_halved",
        "parallel",
        "pipeline: the aux-loss autoscaler sends scale / 2 (a second 1/m) into the balance loss's backward",
        [("moetrain/parallel/pipeline_stage.py", "* ctx.scale, None", "* ctx.scale / 2, None")],
        "tests/parallel/test_pipeline.py::test_pp2_equals_one_process_with_aux_loss",
    ),
    _m(
        "pp_stage_experts_of_another_ep_rank",
        "parallel",
        "pipeline x EP: each stage materialises the next EP rank's experts instead of its own",
        [
            (
                "moetrain/parallel/pipeline_stage.py",
                "_materialise(model, ep, ep_rank,",
                "_materialise(model, ep, (ep_rank + 1) % ep,",
            )
        ],
        "tests/parallel/test_pipeline.py::test_stage_meta_init_equals_one_process_init",
    ),
    # ------------------------------------------------------------------ hf: lazy safetensors import, loss-free bias
    _m(
        "hf_lazy_square_transposed",
        "hf",
        "lazy safetensors import: square matrices read transposed (an [out, in] / [in, out] mix-up in the reader)",
        [
            (
                "moetrain/hf/lazy.py",
                "return t.float() if t.is_floating_point() else t",
                "return (t.float().mT if t.dim() == 2 and t.shape[0] == t.shape[1] else t.float()) if t.is_floating_point() else t",
            )
        ],
        "tests/hf/test_lazy_safetensors.py",
    ),
    _m(
        "loss_free_bias_sign",
        "moe",
        "loss-free balancing raises the bias of overloaded experts (sign(load - mean) instead of sign(mean - load))",
        [("moetrain/moe/router.py", "torch.sign(load.mean() - load)", "torch.sign(load - load.mean())")],
        "tests/moe/test_balance.py::test_loss_free_updates_drive_maxvio_down_on_a_skewed_router",
        fast=True,
    ),
    # ------------------------------------------------------------------ train: the schedule, config: the bounds
    _m(
        "lr_warmup_off_by_one",
        "train",
        "warmup multiplier step / warmup instead of (step + 1) / warmup: the first optimizer step at rate 0",
        [("moetrain/train/optim.py", "return (step + 1) / cfg.warmup_steps", "return step / cfg.warmup_steps")],
        "tests/train/test_optim.py",
        fast=True,
    ),
    _m(
        "lr_cosine_decay_too_long",
        "train",
        "the cosine decays over max_steps instead of max_steps - warmup_steps (min_lr_ratio never reached)",
        [("moetrain/train/optim.py", "max(1, max_steps - cfg.warmup_steps)", "max(1, max_steps)")],
        "tests/train/test_optim.py",
        fast=True,
    ),
    _m(
        "lr_progress_unclamped",
        "train",
        "cosine progress not clamped at 1: past max_steps (a resume with a lower max_steps) the rate climbs again",
        [
            (
                "moetrain/train/optim.py",
                "progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)",
                "progress = (step - cfg.warmup_steps) / decay_steps",
            )
        ],
        "tests/train/test_optim.py",
        fast=True,
    ),
    _m(
        "lr_bound_strict",
        "config",
        "optim.lr's bound strict (lr >= 10 refused): the documented edge lr=10 no longer runs",
        [("moetrain/config/limits.py", "if o.lr > MAX_LR:", "if o.lr >= MAX_LR:")],
        "tests/config/test_optim_trainer_bounds.py::test_the_bounds_themselves_are_valid",
        fast=True,
    ),
    _m(
        "weight_decay_bound_ignores_lr",
        "config",
        "the decay bound checks weight_decay alone instead of lr x weight_decay (lr=10, weight_decay=0.2 let through)",
        [
            (
                "moetrain/config/limits.py",
                "if o.lr * o.weight_decay > MAX_DECAY_FACTOR:",
                "if o.weight_decay > MAX_DECAY_FACTOR:",
            )
        ],
        "tests/config/test_optim_trainer_bounds.py",
        fast=True,
    ),
]
