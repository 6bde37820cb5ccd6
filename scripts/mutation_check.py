"""Plant plausible MoE-trainer bugs one at a time and report which the test suite catches.

Each mutation is a textual edit of one or more source files, the kind of bug
other MoE trainers shipped (a detached P_i in a balance loss, a wrong EP
gradient scale, experts swapped in a reshard, a capacity off by one, ...). For
each, the repository (sources, tests, configs; no .git, no virtualenv) is
copied to a temporary directory, the edit applied there (the working tree is
never touched), and only the test files that guard that code run against the
copy. A mutation is *caught* when pytest reports failures (exit status 1).

    python scripts/mutation_check.py            # every mutation, then a summary table
    python scripts/mutation_check.py --list     # names and the tests each runs
    python scripts/mutation_check.py --only capacity_off_by_one --baseline

``--baseline`` first runs the selected tests on an unmutated copy (they must
pass, or a "caught" means nothing). Exit status 0 when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("moetrain", "tests", "configs", "hydra_plugins", "scripts", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    edits: tuple[tuple[str, str, str], ...]
    """(file, old text, new text); each old text must occur exactly once."""
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "balance_detached_p",
        "P_i detached in every f*P balance loss (values unchanged, no gradient to the router)",
        (("moetrain/moe/layer.py", "p_N = s_TN.mean(0)", "p_N = s_TN.detach().mean(0)"),),
        ("tests/test_balance_grads.py",),
    ),
    Mutation(
        "seq_loss_over_tokens",
        "sequence-wise loss computed over all tokens of the micro-batch instead of averaged per sequence",
        (
            (
                "moetrain/moe/balance.py",
                "    _, S, N = norm_scores_BSN.shape\n"
                "    f_BN = counts_BN.detach().float() * N / (top_k * S)\n"
                "    return (f_BN * norm_scores_BSN.mean(dim=1)).sum(dim=-1).mean()",
                "    B, S, N = norm_scores_BSN.shape\n"
                "    f_N = counts_BN.detach().float().sum(0) * N / (top_k * S * B)\n"
                "    return (f_N * norm_scores_BSN.mean(dim=(0, 1))).sum()",
            ),
        ),
        ("tests/test_balance_grads.py",),
    ),
    Mutation(
        "global_scope_ignored",
        "balance.scope=global: the layer keeps its micro-batch selection counts instead of the step's",
        (
            (
                "moetrain/moe/layer.py",
                'counts_f = g["expert"] if g is not None else sel_counts_N',
                "counts_f = sel_counts_N",
            ),
        ),
        ("tests/test_balance_grads.py",),
    ),
    Mutation(
        "sigmoid_p_unnormalised",
        "sigmoid affinities enter P_i without the per-token normalisation (DeepSeek-V3 eq. 19)",
        (
            (
                "moetrain/moe/layer.py",
                "s_TN = s_TN / s_TN.sum(dim=-1, keepdim=True)",
                "s_TN = s_TN * 1.0",
            ),
        ),
        ("tests/test_balance_grads.py",),
    ),
    Mutation(
        "comm_loss_uses_k_for_m",
        "communication loss divides by K instead of the device limit M",
        (("moetrain/moe/layer.py", "m = self.cfg.router.topk_groups or min(K, G)", "m = K"),),
        ("tests/test_balance_grads.py",),
    ),
    Mutation(
        "capacity_off_by_one",
        "per-expert capacity keeps C + 1 assignments",
        (("moetrain/moe/routing.py", "return keep_TK & (rank_A < cap)", "return keep_TK & (rank_A <= cap)"),),
        ("tests/test_capacity_reference.py",),
    ),
    Mutation(
        "drop_by_position",
        "capacity drops by position (first come, first kept) instead of by affinity",
        (
            (
                "moetrain/moe/routing.py",
                "p_A = priority_TK.detach().reshape(-1).double()",
                "p_A = torch.zeros(priority_TK.numel(), device=priority_TK.device)",
            ),
        ),
        ("tests/test_capacity_reference.py",),
    ),
    Mutation(
        "device_drop_keeps_lowest",
        "device-level dropping keeps the lowest-affinity assignments of an over-budget device",
        (
            (
                "moetrain/moe/routing.py",
                "kept_TK = capacity_keep(group_TK, priority_TK, keep_TK, num_groups, int(budget))",
                "kept_TK = capacity_keep(group_TK, -priority_TK, keep_TK, num_groups, int(budget))",
            ),
        ),
        ("tests/test_capacity_reference.py",),
    ),
    Mutation(
        "ep_grad_scale",
        "expert gradients averaged over the expert-data-parallel group (1/EDP) instead of 1/W",
        (
            (
                "moetrain/parallel/grad_sync.py",
                "_flat_all_reduce(expert_grads, pc.edp_group, 1.0 / pc.world_size)",
                "_flat_all_reduce(expert_grads, pc.edp_group, 1.0 / pc.edp_size)",
            ),
        ),
        ("tests/test_ep_skew.py",),
    ),
    Mutation(
        "clip_skips_experts",
        "clipping scales the dense gradients only (the norm is right, expert gradients stay unclipped)",
        (("moetrain/parallel/grad_sync.py", "        for p in dense + experts:\n", "        for p in dense:\n"),),
        ("tests/test_ep_skew.py",),
    ),
    Mutation(
        "reshard_swapped_expert_moments",
        "AdamW moments of a rank's local experts restored in reverse expert order",
        (
            (
                "moetrain/train/checkpoint.py",
                'parts = [buffers[f"optim.{name}.{lay.offset + e}.{key}"] for e in range(lay.num_local)]',
                'parts = [buffers[f"optim.{name}.{lay.offset + e}.{key}"] for e in reversed(range(lay.num_local))]',
            ),
        ),
        ("tests/test_reshard_continue.py",),
    ),
    Mutation(
        "reshard_local_expert_index",
        "expert weights and moments keyed by local instead of global index (same-EP resume still exact)",
        (
            (
                "moetrain/train/checkpoint.py",
                'out[f"model.{name}.{lay.offset + e}"] = t[e]',
                'out[f"model.{name}.{lay.offset + e}"] = t[lay.num_local - 1 - e]',
            ),
        ),
        ("tests/test_reshard_continue.py",),
    ),
    Mutation(
        "loss_free_load_not_all_reduced",
        "loss-free bias updated from this rank's load before the all-reduce",
        (
            (
                "moetrain/train/trainer.py",
                "        acc.reduce(self.pc)\n        if applied:",
                "        local_loads = {i: v.clone() for i, v in acc.loads.items()}\n"
                "        acc.reduce(self.pc)\n        if applied:",
            ),
            (
                "moetrain/train/trainer.py",
                "layer.router.update_bias(acc.loads[i])",
                "layer.router.update_bias(local_loads[i])",
            ),
        ),
        ("tests/test_reshard_continue.py",),
    ),
    Mutation(
        "group_score_sum_not_max",
        "DeepSeek-V2 device-limited routing scores a group by the sum of its affinities, not its best one",
        (
            (
                "moetrain/moe/routing.py",
                "group_TG = grouped_TGE.amax(dim=-1)",
                "group_TG = grouped_TGE.sum(dim=-1)",
            ),
        ),
        ("tests/test_never_run.py",),
    ),
    Mutation(
        "ac_rng_not_preserved",
        "activation checkpointing recomputes noisy routing with fresh noise",
        (("moetrain/model/apply.py", "preserve_rng_state=True", "preserve_rng_state=False"),),
        ("tests/test_never_run.py",),
    ),
    Mutation(
        "deterministic_flag_noop",
        "trainer.deterministic=true leaves deterministic algorithms off",
        (
            (
                "moetrain/train/trainer.py",
                "torch.use_deterministic_algorithms(True)",
                "torch.use_deterministic_algorithms(False)",
            ),
        ),
        ("tests/test_determinism.py",),
    ),
]


def make_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def apply(root: Path, m: Mutation) -> None:
    for rel, old, new in m.edits:
        path = root / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutation {m.name}: {rel} holds {text.count(old)} copies of the text to change")
        path.write_text(text.replace(old, new))


def run_tests(root: Path, tests: tuple[str, ...], verbose: bool) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(root)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if verbose:
        print(out[-4000:])
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return proc.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def check(m: Mutation, baseline: bool, verbose: bool) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp)
        make_copy(root)
        if baseline:
            rc, _, last = run_tests(root, m.tests, verbose)
            if rc != 0:
                return "BASELINE FAILS", 0.0, last
        apply(root, m)
        rc, secs, last = run_tests(root, m.tests, verbose)
    verdict = {0: "MISSED", 1: "caught"}.get(rc, f"error (pytest exit {rc})")
    return verdict, secs, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--baseline", action="store_true", help="first run the tests on an unmutated copy")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each pytest run's tail")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {' '.join(m.tests):36} {m.bug}")
        return 0
    rows = []
    for m in chosen:
        verdict, secs, last = check(m, args.baseline, args.verbose)
        rows.append((m, verdict))
        print(f"{verdict:8} {m.name:32} {secs:6.1f}s  {' '.join(m.tests)}  [{last}]", flush=True)
    caught = sum(v == "caught" for _, v in rows)
    print(f"\n{caught}/{len(rows)} mutations caught")
    for m, v in rows:
        if v != "caught":
            print(f"  {v}: {m.name} ({m.bug})")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
