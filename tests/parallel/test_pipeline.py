"""Pipeline parallelism (moetrain.parallel.pipeline, moetrain.parallel.pipeline_stage): the split rule, the
bubble formulas, the stage meta build bitwise equal to the one-process init, and PP=2 on 2 gloo ranks equal to
one process (loss and every gradient, aux loss on) for each schedule."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import BalanceConfig, ConfigError, ModelConfig, MoEConfig, TrainConfig, validate
from moetrain.config.pipeline_layout import (
    PP_SCHEDULES,
    default_split,
    parse_split,
    stage_ids,
    stage_specs,
    stages_per_rank,
)
from moetrain.model import build_model
from moetrain.model.apply import apply_activation_checkpointing
from moetrain.parallel.pipeline import SCHEDULES, available_schedules, bubble_fraction, build_schedule, check_schedule
from moetrain.parallel.pipeline_stage import build_stage_modules, check_pipeline_model, pipeline_stage, skip_normal
from moetrain.train.step import lm_loss
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.unit

VOCAB, SEQ, SEED, BATCH, MICRO = 64, 16, 7, 8, 4
CPU = torch.device("cpu")


def _configs() -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, balance=BalanceConfig(expert_coef=0.1))
    return model, moe


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


def test_default_split_balances_blocks_middle_first() -> None:
    """Catches a split that loses or duplicates blocks, or loads the embedding/head stages with the remainder."""
    assert default_split(8, 4) == [2, 2, 2, 2]
    assert default_split(10, 4) == [2, 3, 3, 2]
    assert default_split(5, 4) == [1, 2, 1, 1]
    specs = stage_specs(10, 4)
    assert [list(s.blocks) for s in specs] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert [s.embedding for s in specs] == [True, False, False, False]
    assert [s.head for s in specs] == [False, False, False, True]


def test_pp_layers_rule_and_its_errors() -> None:
    """Catches a rule that silently drops blocks, miscounts stages or misplaces the embedding and head."""
    assert parse_split("embedding+3,4,4,3+head", 14, 4) == [3, 4, 4, 3]
    assert parse_split("embedding+6+head", 6, 1) == [6]
    assert [list(s.blocks) for s in stage_specs(6, 2, "embedding+1,5+head")] == [[0], [1, 2, 3, 4, 5]]
    for rule, n_stages, match in [
        ("embedding+3,4,4+head", 4, "3 stages, the layout has 4"),
        ("3,4,4,3+head", 4, "must start 'embedding\\+'"),
        ("embedding+3,4,4,2+head", 4, "13 blocks, the model has 14"),
        ("embedding+3,x,4,3+head", 4, "count of blocks"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_split(rule, 14, n_stages)
    with pytest.raises(ConfigError, match="5 stages for 4 blocks"):
        default_split(4, 5)


def test_schedules_bubbles_and_stage_placement() -> None:
    """Catches a wrong bubble formula (Narayanan et al. 2021; Qi et al. 2023) or stage placement."""
    assert bubble_fraction("gpipe", 4, 8) == bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction("zbv", 4, 8, 2) == pytest.approx(3 / 51)
    assert stage_ids(1, 4, 2, "loop") == [1, 5]
    assert stage_ids(1, 4, 2, "v") == [1, 6]
    assert stages_per_rank("1f1b", 1) == 1 and stages_per_rank("interleaved_1f1b", 3) == 3
    assert {"gpipe", "1f1b", "interleaved_1f1b"} <= set(available_schedules())
    assert tuple(SCHEDULES) == PP_SCHEDULES
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule='pipedream'"):
        check_schedule("pipedream")
    with pytest.raises(ConfigError, match=r"parallel\.pp_virtual=1"):
        stages_per_rank("interleaved_1f1b", 1)


def test_pipeline_refuses_what_it_cannot_keep_exact() -> None:
    """Catches a PP run that would silently drop the tied-embedding gradient sum or the model-scope losses."""
    model, moe = _configs()
    with pytest.raises(ConfigError, match="tie_embeddings"):
        check_pipeline_model(ModelConfig(**{**model.__dict__, "tie_embeddings": True}), moe, 2)
    pooled = MoEConfig(num_experts=4, top_k=2, balance=BalanceConfig(expert_coef=0.1, expert_form="transformers"))
    with pytest.raises(ConfigError, match="model-scope"):
        check_pipeline_model(model, pooled, 2)


@pytest.mark.parametrize("numel", [16, 40, 64, 65, 100, 1000])
def test_skip_normal_advances_the_generator_as_one_draw(numel: int) -> None:
    """Catches chunked skipping that consumes a different number of draws than the whole tensor (a last chunk
    under 16 elements, or a chunk not a multiple of 16), which would shift every later stage's values."""
    torch.manual_seed(0)
    torch.empty(numel).normal_(0.0, 0.02)
    want = torch.rand(4)
    torch.manual_seed(0)
    skip_normal(numel, torch.float32, 0.02, chunk=32)
    torch.testing.assert_close(torch.rand(4), want, rtol=0, atol=0)


@pytest.mark.parametrize("ep", [1, 2])
def test_stage_meta_init_equals_one_process_init(ep: int) -> None:
    """Catches a stage whose layers are not bitwise the one-process model's for the same seed (draws skipped in
    the wrong order or amount), with a scratch chunk small enough that skipping is chunked."""
    model_cfg, moe_cfg = _configs()
    full = dict(build_model(model_cfg, moe_cfg, VOCAB, SEQ, seed=SEED).named_parameters())
    specs = stage_specs(model_cfg.n_layers, 3)
    for ep_rank in range(ep):
        for spec in specs:
            (stage,) = build_stage_modules(
                model_cfg, moe_cfg, VOCAB, SEQ, [spec], 3, ep=ep, ep_rank=ep_rank, seed=SEED, skip_chunk=64
            )
            for name, p in stage.named_parameters():
                want = full[name]
                if name.endswith(("experts.w13", "experts.w2")):
                    n = want.shape[0] // ep
                    want = want[ep_rank * n : (ep_rank + 1) * n]
                torch.testing.assert_close(p, want, rtol=0, atol=0, msg=name)
            blocks = {n.split(".")[1] for n, _ in stage.named_parameters() if n.startswith("blocks.")}
            assert blocks == {str(i) for i in spec.blocks}


def _one_process(batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The one-process step: per micro-batch ``(lm + aux) / M`` backward (moetrain.train.step)."""
    model_cfg, moe_cfg = _configs()
    model = build_model(model_cfg, moe_cfg, VOCAB, SEQ, seed=SEED)
    lm, aux = [], []
    for mb in batch.chunk(MICRO):
        out = model(mb[:, :-1])
        loss = lm_loss(out.logits, mb[:, 1:])
        ((loss + out.aux_loss) / MICRO).backward()
        lm.append(loss.detach())
        aux.append(out.aux_loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, torch.stack(lm), torch.stack(aux)


def _pp_rank(rank: int, world: int, schedule: str, virtual: int, attach: bool, ac: bool) -> dict[str, object]:
    model_cfg, moe_cfg = _configs()
    n_per = stages_per_rank(schedule, virtual)
    n_stages = world * n_per
    specs = stage_specs(model_cfg.n_layers, n_stages)
    mine = [specs[i] for i in stage_ids(rank, world, n_per, SCHEDULES[schedule].style)]
    modules = build_stage_modules(model_cfg, moe_cfg, VOCAB, SEQ, mine, n_stages, seed=SEED)
    for m in modules:
        m.attach_aux = attach
        if ac:
            apply_activation_checkpointing(m)  # type: ignore[arg-type]
    stages = [
        pipeline_stage(
            m, n_stages, microbatch=BATCH // MICRO, seq_len=SEQ, dim=model_cfg.dim, vocab_size=VOCAB, device=CPU
        )
        for m in modules
    ]
    batch = _batch()
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses: list[torch.Tensor] = []
    first, last = any(s.embedding for s in mine), any(s.head for s in mine)
    build_schedule(schedule, stages, MICRO, lm_loss).step(
        *((inputs,) if first else ()), tokens_BS=inputs, target=targets if last else None, losses=losses
    )
    return {
        "grads": {n: p.grad.clone() for m in modules for n, p in m.named_parameters()},
        "lm": torch.stack(losses) if last else None,
        "aux": {m.spec.index: torch.stack(m.aux_losses) for m in modules if m.aux_losses},
    }


def _run_pp(schedule: str, virtual: int = 1, attach: bool = True, ac: bool = False) -> list[dict[str, object]]:
    return run_distributed(_pp_rank, 2, schedule, virtual, attach, ac)


@pytest.mark.parametrize(
    ("schedule", "virtual", "ac"),
    [
        ("gpipe", 1, False),
        ("1f1b", 1, False),
        ("1f1b", 1, True),
        ("interleaved_1f1b", 2, False),
        ("interleaved_zero_bubble", 2, False),
        ("zbv", 2, False),
    ],
)
def test_pp2_equals_one_process_with_aux_loss(schedule: str, virtual: int, ac: bool) -> None:
    """Catches any schedule whose gradients differ from the one-process step: a stage's aux loss missing or
    scaled differently from the LM loss, micro-batches mis-split, a stage's parameters lost; the LM losses and
    the stages' aux losses (summing to the model's) must equal the one-process micro-batches' too. ``ac``: each
    stage's blocks under activation checkpointing (their recomputation must route identically)."""
    want, lm, aux = _one_process(_batch())
    ranks = _run_pp(schedule, virtual, ac=ac)
    grads = {n: g for r in ranks for n, g in r["grads"].items()}  # type: ignore[union-attr]
    assert grads.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    (last,) = [r["lm"] for r in ranks if r["lm"] is not None]  # rank 1's, rank 0's under the V shape (zbv)
    torch.testing.assert_close(last, lm, rtol=1e-5, atol=0)
    stage_aux = [a for r in ranks for a in r["aux"].values()]  # type: ignore[union-attr]
    torch.testing.assert_close(torch.stack(stage_aux).sum(0), aux, rtol=1e-5, atol=1e-8)


def test_aux_loss_left_out_of_the_backward_is_caught() -> None:
    """The planted bug: without the autoscaler the first stage's balance loss gets no gradient, so its routers'
    gradients differ from the one-process step (and the last stage's, whose aux loss also rides the autoscaler)."""
    want, _, _ = _one_process(_batch())
    ranks = _run_pp("1f1b", attach=False)
    grads = ranks[0]["grads"]
    router = "blocks.1.ffn.router.weight"
    assert router in grads  # type: ignore[operator]
    assert not torch.allclose(grads[router], want[router], rtol=1e-5, atol=1e-7)  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "world", "message"),
    [
        ({"pp": 3}, 4, "parallel.pp=3: must divide the world size (4 ranks)"),
        ({"pp": 0}, 4, "parallel.pp=0: must be > 0"),
        ({"pp_schedule": "pipedream"}, 1, "parallel.pp_schedule='pipedream': must be one of gpipe, 1f1b"),
        ({"pp": 2, "pp_layers": "embedding+1,2+head"}, 2, "3 blocks, the model has 4 (model.n_layers)"),
        ({"pp": 2, "pp_layers": "embedding+4+head"}, 2, "1 stages, the layout has 2"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual": 1}, 2, "parallel.pp_virtual=1: interleaved"),
        ({"pp": 2, "engine.name": "deepspeed"}, 4, "parallel.pp=2: pipeline stages are run by the native engine only"),
        ({"pp": 2, "trainer.compile": True}, 4, "parallel.pp=2: trainer.compile is not applied to pipeline stages"),
        ({"pp": 2, "ep": 4}, 4, "parallel.ep=4: must divide the world size / parallel.pp (2 ranks)"),
        ({"pp": 5}, 5, "parallel.pp: 5 stages for 4 blocks"),
        (
            {"pp": 2, "trainer.micro_batch_size": 16},
            2,
            "1f1b needs at least parallel.pp=2 micro-batches per pipeline, the step has 1",
        ),
        ({"pp": 2, "model.tie_embeddings": True}, 2, "parallel.pp > 1 with model.tie_embeddings"),
        (
            {"pp": 2, "pp_schedule": "interleaved_1f1b", "trainer.micro_batch_size": 1, "trainer.global_batch_size": 5},
            2,
            "interleaved_1f1b needs the micro-batches per pipeline (5) a multiple of 2",
        ),
    ],
)
def test_pp_config_errors_are_one_line(changes: dict[str, object], world: int, message: str) -> None:
    """Catches a pipeline layout accepted though it cannot run (pp not dividing the ranks, a split rule not
    covering the blocks, an unknown schedule, EP not fitting a stage), or ``pp > 1`` with an engine or a
    compilation that does not run pipeline stages (``section.key`` names another section than ``parallel``)."""
    cfg = TrainConfig()
    for key, value in changes.items():
        section, name = key.split(".") if "." in key else ("parallel", key)
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


def _pp_ep_rank(rank: int, world: int) -> dict[str, torch.Tensor]:
    """PP=2 x EP=2 on 4 ranks: mesh (pp, ep); pipelines {0, 2} and {1, 3}, each fed its own batch; a stage's
    non-expert gradients averaged over its 2 data-parallel ranks, its experts' divided by them (the EP rule of
    docs/parallelism.md inside one stage)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moetrain.parallel import ParallelContext, apply_expert_parallel, expert_parameters

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    pc = ParallelContext(rank=rank, world_size=world, ep_size=2, ep_group=mesh["ep"].get_group())
    pp_rank, dp_rank = divmod(rank, 2)
    model_cfg, moe_cfg = _configs()
    specs = stage_specs(model_cfg.n_layers, 2)
    (module,) = build_stage_modules(
        model_cfg, moe_cfg, VOCAB, SEQ, [specs[pp_rank]], 2, ep=2, ep_rank=pc.ep_rank, seed=SEED
    )
    apply_expert_parallel(module, pc)
    stage = pipeline_stage(
        module,
        2,
        microbatch=BATCH // 2 // MICRO,
        seq_len=SEQ,
        dim=model_cfg.dim,
        vocab_size=VOCAB,
        device=CPU,
        group=mesh["pp"].get_group(),
    )
    batch = _batch().chunk(2)[dp_rank]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    first, last = specs[pp_rank].embedding, specs[pp_rank].head
    build_schedule("1f1b", [stage], MICRO, lm_loss).step(
        *((inputs,) if first else ()), tokens_BS=inputs, target=targets if last else None
    )
    experts = {id(p) for p in expert_parameters(module)}
    for p in module.parameters():
        if id(p) not in experts:
            dist.all_reduce(p.grad, group=mesh["ep"].get_group())
        p.grad /= 2
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_pp2_x_ep2_equals_one_process_with_aux_loss() -> None:
    """Catches PP composed with EP going wrong: the all-to-all over the wrong group (another stage's ranks),
    a stage's experts not the EP rank's slice of the one-process init, or the aux losses of EP ranks lost. One
    process runs both pipelines' micro-batches (BATCH / MICRO sequences each, as one EP rank's), the step's
    loss their mean."""
    batch = _batch()
    model_cfg, moe_cfg = _configs()
    model = build_model(model_cfg, moe_cfg, VOCAB, SEQ, seed=SEED)
    per_rank = [half.chunk(MICRO) for half in batch.chunk(2)]
    for i in range(MICRO):  # each EP rank's micro-batch i, both forwarded as one EP step routes them
        for mbs in per_rank:
            out = model(mbs[i][:, :-1])
            ((lm_loss(out.logits, mbs[i][:, 1:]) + out.aux_loss) / (2 * MICRO)).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    ranks = run_distributed(_pp_ep_rank, 4)
    n_experts = moe_cfg.num_experts // 2
    for rank, grads in enumerate(ranks):
        for name, g in grads.items():
            ref = want[name]
            if name.endswith(("experts.w13", "experts.w2")):
                ref = ref[(rank % 2) * n_experts : (rank % 2 + 1) * n_experts]
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
    assert {n for r in ranks for n in r} == set(want)
