#!/usr/bin/env bash
# The toy world, end to end: every stage is one `iap-rt toy` command, resumable, and this
# script only chains them with the paths the committed results were made with.
#
#   bash bench/toy_pipeline.sh STAGE...      stages: data base grid curves plugin (in order;
#                                            `base` is optional: the grid starts from $BASE)
#
# Run it detached on a shared machine (setsid nohup bash bench/toy_pipeline.sh base grid ... &);
# re-running a stage resumes it (the base from its checkpoint, the grid and curves from their
# finished cells). Work files go to $TOY (default scratch/toy, git-ignored; the committed
# results were made in scratch/toy2 when the world was `iap-rt toy2`: TOY=scratch/toy2 resumes
# such a work dir). New results are written under toy_* names (bench/results/toy_transfer.*,
# toy_curves.json, toy_plugin*.json, docs/toy_curves.png); the committed toy2_* records stay.
set -euo pipefail
TOY=${TOY:-scratch/toy}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 IAP_RT_THREADS=1 OMP_WAIT_POLICY=PASSIVE
BUDGET_S=${BUDGET_S:-180}   # CPU seconds per grid cell (one thread); denoise at 100 % gets 5x
BASE=${BASE:-iap_rt/data/toy_base}  # the committed English base (the `base` stage retrains it)
WORK=${WORK:-$TOY/grid}  # grid, curves and plug-in work dir: one per base (it refuses another)

for stage in "$@"; do
  echo "== $stage $(date -u +%FT%TZ)"
  case $stage in
    data)
      [ -f "$TOY/data/meta.json" ] || iap-rt toy data --out "$TOY/data"
      [ -f "$TOY/outline/meta.json" ] || iap-rt toy data --out "$TOY/outline" --n 8000 --style outline ;;
    base)
      # retrains the committed base (iap_rt/data/toy_base: 90 CPU-min at one thread; the
      # learning rate cools down over the last 30 % of that budget, so resume with the same
      # one); compare $TOY/base_eval.json with bench/results/toy2_base.json, and run the later
      # stages on it with BASE=$TOY/base
      iap-rt toy base --data "$TOY/data" --out "$TOY/base" --minutes 90 --threads 1
      [ -f "$TOY/base_eval.json" ] ||
        iap-rt toy base-eval --base "$TOY/base" --out "$TOY/base_eval.json" ;;
    grid)
      iap-rt toy transfer --data "$TOY/data" --base "$BASE" --work "$WORK" \
        --budget-s "$BUDGET_S" --jobs 2 ;;
    curves)
      iap-rt toy curves --data "$TOY/data" --base "$BASE" --work "$WORK" \
        --budget-s "$BUDGET_S" --jobs 2 ;;
    plugin)
      [ -f "$WORK/outline_base/toy_finetune.json" ] ||
        iap-rt toy finetune --base "$BASE" --data "$TOY/outline" --out "$WORK/outline_base" --minutes 20
      iap-rt toy plugin --finetuned "$WORK/outline_base" --work "$WORK" --source curves \
        --out bench/results/toy_plugin_curves.json
      if [ -d "$WORK/runs/10pct_s0_pivot/chinese_encoder" ]; then  # the grid ran in $WORK
        iap-rt toy plugin --finetuned "$WORK/outline_base" --work "$WORK"
      else
        echo "no grid in $WORK: the grid-source plug-in run (toy_plugin.json) is skipped"
      fi ;;
    *) echo "unknown stage $stage (data base grid curves plugin)" >&2; exit 2 ;;
  esac
done
