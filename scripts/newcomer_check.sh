#!/usr/bin/env bash
# The newcomer's path, end to end at tiny scale, in the README's quickstart install only (`scripts/setup.sh`,
# no extras): git clone -> scripts/setup.sh -> a first run, stopped and continued by rerunning it -> a torchrun
# sweep (first with a bad job: nothing launched) -> its summary -> plots and the HTML report -> the inspector,
# generation and the planner -> export. Every command ends with exit 0, or with one line naming the command
# that adds the missing extra (checked below). Then, as that line says, `scripts/setup.sh transformers`, and the
# export loads in transformers.
#   scripts/newcomer_check.sh                 # in CI: the clone's .venv sees this checkout's .venv packages,
#                                             # less those of the extras (transformers, deepspeed, slurm)
#   NEWCOMER_FRESH=1 scripts/newcomer_check.sh  # a truly fresh .venv (downloads torch, as a newcomer would)
# NEWCOMER_STEPS (default 6) sets the length of the first run (the README's quickstart trains 300 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
steps=${NEWCOMER_STEPS:-6}
deps_python=${NEWCOMER_DEPS_PYTHON:-$repo/.venv/bin/python}  # whose packages the clone's .venv sees
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetrain-newcomer.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export WANDB_MODE=offline WANDB_SILENT=true MOETRAIN_CACHE="$tmp/cache"
unset WANDB_API_KEY PYTHONPATH || true
say() { printf '\n== newcomer: %s\n' "$*"; }
# `expect_extra EXTRA CMD...`: CMD exits 2 with one line on stderr naming `scripts/setup.sh EXTRA`, no traceback.
expect_extra() {
  local extra=$1 rc=0
  shift
  "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
  if [ "$rc" -ne 2 ] || [ "$(grep -vc '^$' "$tmp/err")" -ne 1 ] || ! grep -q "scripts/setup.sh $extra" "$tmp/err"; then
    echo "newcomer: FAILED: '$*' should stop in one line naming scripts/setup.sh $extra (exit $rc):" >&2
    cat "$tmp/out" "$tmp/err" >&2
    exit 1
  fi
  cat "$tmp/err"
}

say "git clone"
git clone --quiet "$repo" "$tmp/moetrain"
cd "$tmp/moetrain"
if [ -z "${NEWCOMER_FRESH:-}" ]; then
  # The packages of this checkout's .venv without downloading them again (its own .pth files stay inactive),
  # less the extras', as a quickstart install has them: a folder of links to all the others.
  "$deps_python" -m venv --without-pip .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  deps_site=$("$deps_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir "$tmp/deps"
  for p in "$deps_site"/*; do
    case $(basename "$p") in
      transformers | transformers-*.dist-info | deepspeed | deepspeed-*.dist-info | hydra_plugins) ;;
      *) ln -s "$p" "$tmp/deps/" ;;
    esac
  done
  echo "$tmp/deps" > "$site/_newcomer_deps.pth"
fi

say "scripts/setup.sh (the README's quickstart install, no extras)"
scripts/setup.sh
.venv/bin/python -c 'import moetrain, sys; assert sys.argv[1] in moetrain.__file__, moetrain.__file__' "$PWD"
if .venv/bin/python -c 'import transformers' 2>/dev/null; then echo "newcomer: transformers is visible" >&2; exit 1; fi
export PATH="$PWD/.venv/bin:$PATH"

say "a first run (the README's quickstart, $steps steps of the smoke model), stopped by SIGTERM, then rerun"
first=(experiment=smoke trainer.max_steps="$steps" trainer.eval_every=0 trainer.log_every=1 data.max_val_sequences=8
       checkpoint.every=1 run_name=first)
moetrain-train "${first[@]}" > "$tmp/first.log" 2>&1 &
pid=$!
until grep -q "^step " "$tmp/first.log" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null; do sleep 1; done
kill -TERM "$pid" 2>/dev/null || true
wait "$pid" || true
cat "$tmp/first.log"
grep -q "to continue this run: moetrain-train ${first[*]}\$" "$tmp/first.log"  # the same command continues it
moetrain-train "${first[@]}" | tee "$tmp/rerun.log"
grep -q "resumed from" "$tmp/rerun.log" && test -f runs/first/summary.json -a "$(ls runs)" = first

say "a torchrun sweep with an invalid job: nothing is launched, the job is named"
sweep=(-m hydra/launcher=torchrun hydra.launcher.nproc_per_node=1 hydra.launcher.max_parallel=2
       experiment=smoke trainer.max_steps=2 trainer.eval_every=0 data.max_val_sequences=8)
rc=0
moetrain-train "${sweep[@]}" hydra.sweep.dir=multirun/bad optim.lr=1e-3,-1 2>"$tmp/err" || rc=$?
cat "$tmp/err"
test "$rc" -eq 2 && grep -q "sweep job #1 (.*optim.lr=-1): config error" "$tmp/err" && test ! -d multirun/bad/0

say "a torchrun sweep of two jobs, and its summary"
moetrain-train "${sweep[@]}" hydra.sweep.dir=multirun/first optim.lr=1e-3,3e-3
moetrain-sweep-summary multirun/first | tee "$tmp/summary.md"
test "$(grep -c completed "$tmp/summary.md")" -eq 2

say "plots and the HTML report"
moetrain-plot runs/first --html
moetrain-plot multirun/first --out plots/sweep
test -f runs/first/plots/report.html -a -f runs/first/plots/load_heatmap.png -a -f plots/sweep/loss.png

say "the inspector, generation and the planner"
moetrain-inspect runs/first --corpus 4 --threads 1 | tail -3
test -f runs/first/routes.html
moetrain-generate runs/first --prompt "import " --max-new-tokens 8 --seed 0 --threads 1
moetrain-plan

say "export (no transformers folder without the extra), and an import, which needs it"
moetrain-export runs/first export | tee "$tmp/export.log"
test -f export/model.safetensors && grep -q "scripts/setup.sh transformers" "$tmp/export.log"
expect_extra transformers moetrain-export --from-hf export imported

say "scripts/setup.sh transformers (as the line says), export again, and load the export in transformers"
if [ -z "${NEWCOMER_FRESH:-}" ]; then ln -s "$deps_site"/transformers* "$tmp/deps/"; fi
scripts/setup.sh transformers
moetrain-export runs/first export2
.venv/bin/python - <<'PY'
import torch
import transformers

hf = transformers.AutoModelForCausalLM.from_pretrained("export2/hf", dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained("export2/hf")
ids = tok("def main():", return_tensors="pt").input_ids
out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=hf.config.pad_token_id)
print("transformers", type(hf).__name__, "continues 'def main():' with", repr(tok.decode(out[0, ids.shape[1]:])))
PY
say "OK: clone, setup, train, stop and continue, sweeps, summary, plots, inspect, generate, plan, export, transformers"
