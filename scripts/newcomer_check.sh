#!/usr/bin/env bash
# The newcomer's path, end to end at tiny scale: git clone -> scripts/setup.sh -> a first training run ->
# a torchrun sweep -> its summary -> plots and the HTML report -> export -> load the export in transformers.
#   scripts/newcomer_check.sh                 # in CI: the clone's .venv sees this checkout's .venv packages
#   NEWCOMER_FRESH=1 scripts/newcomer_check.sh  # a truly fresh .venv (downloads torch, as a newcomer would)
# NEWCOMER_STEPS (default 4) sets the length of the first run (the README's quickstart trains 300 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
steps=${NEWCOMER_STEPS:-4}
deps_python=${NEWCOMER_DEPS_PYTHON:-$repo/.venv/bin/python}  # whose packages the clone's .venv sees
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetrain-newcomer.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export WANDB_MODE=offline WANDB_SILENT=true MOETRAIN_CACHE="$tmp/cache"
unset WANDB_API_KEY PYTHONPATH || true
say() { printf '\n== newcomer: %s\n' "$*"; }

say "git clone"
git clone --quiet "$repo" "$tmp/moetrain"
cd "$tmp/moetrain"
if [ -z "${NEWCOMER_FRESH:-}" ]; then
  # Same packages as this checkout's .venv, without downloading them again (its own .pth files stay inactive).
  "$deps_python" -m venv --without-pip .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$deps_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/_newcomer_deps.pth"
fi

say "scripts/setup.sh transformers,plot (the README's install, with the extras export and plots need)"
scripts/setup.sh transformers,plot
.venv/bin/python -c 'import moetrain, sys; assert sys.argv[1] in moetrain.__file__, moetrain.__file__' "$PWD"

say "a first run (the README's quickstart, $steps steps of the smoke model)"
.venv/bin/moetrain-train experiment=smoke trainer.max_steps="$steps" trainer.eval_every=0 data.max_val_sequences=8 \
    run_dir=runs/first
test -f runs/first/summary.json

say "a torchrun sweep of two jobs, and its summary"
.venv/bin/moetrain-train -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=1 hydra.launcher.max_parallel=2 \
    hydra.sweep.dir=multirun/first experiment=smoke trainer.max_steps=2 trainer.eval_every=0 \
    data.max_val_sequences=8 optim.lr=1e-3,3e-3
.venv/bin/moetrain-sweep-summary multirun/first | tee "$tmp/summary.md"
test "$(grep -c completed "$tmp/summary.md")" -eq 2

say "plots and the HTML report"
.venv/bin/moetrain-plot runs/first --html
.venv/bin/moetrain-plot multirun/first --out plots/sweep
test -f runs/first/plots/report.html -a -f runs/first/plots/load_heatmap.png -a -f plots/sweep/loss.png

say "export, and load the export in transformers"
.venv/bin/moetrain-export runs/first export
.venv/bin/python - <<'PY'
import torch
import transformers

hf = transformers.AutoModelForCausalLM.from_pretrained("export/hf", dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained("export/hf")
ids = tok("def main():", return_tensors="pt").input_ids
out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=hf.config.pad_token_id)
print("transformers", type(hf).__name__, "continues 'def main():' with", repr(tok.decode(out[0, ids.shape[1]:])))
PY
say "OK: clone, setup, train, sweep, summary, plots, export, transformers"
