#!/usr/bin/env bash
# The toy-world method study (experiments/README.md, "The method study"): three questions, 5 seeds
# each, as Hydra multiruns into fixed directories, so that running this again resumes where it
# stopped (every run resumes from its last checkpoint; finished runs are skipped). One report each:
#   bash experiments/study.sh [small|large|color|alignment_map|long ...]   (default: the first four)
# Seeds vary slowest, so a study stopped early holds complete seeds. 2 CPU cores: ~70 min in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROOT=${STUDY_ROOT:-outputs/study}
SEEDS=${SEEDS:-0,1,2,3,4}
# 24 epochs of 8 prompts x 4 images (768 sampled images), evaluated at epochs 0, 12 and 24 on the
# training prompts (toy_small: all 32) and 64 stratified unseen prompts, x 2 fixed seeds each
COMMON=(trainer.epochs=24 trainer.eval_every=12 trainer.checkpoint_every=12 trainer.eval_num_prompts=64
  sampler.batch_size=16 trainer.progress_bar=false)

run() {  # name, overrides...
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: python -m rlft -m ${COMMON[*]} $* hydra.sweep.dir=$ROOT/$name"
  "$PY" -m rlft -m "${COMMON[@]}" "$@" "hydra.sweep.dir=$ROOT/$name" >"$ROOT/$name.log" 2>&1  # later values win
  "$PY" -m rlft.report "$ROOT/$name" --baseline "${BASELINE[$name]}" >>"$ROOT/$name.log" 2>&1
  echo "$name: $((SECONDS - start)) s" | tee -a "$ROOT/wall.txt"
}

declare -A BASELINE=(
  [small]=algorithm=ddpo [large]=algorithm=ddpo [color]=algorithm=ddpo_sf [alignment_map]=reward.pixel_map=balanced
  [long]=algorithm=ddpo
)
mkdir -p "$ROOT"
for q in "${@:-color alignment_map small large}"; do
  for name in $q; do
    case $name in
      # PRDP's Table 2 claim: DDPO degrades at large scale while PRDP holds (toy_alignment)
      small) run small "seed=$SEEDS" experiment=toy_small algorithm=ddpo,prdp ;;
      large) run large "seed=$SEEDS" experiment=toy_large algorithm=ddpo,prdp ;;
      # PXPO's claim: with the same sampled images, a per-pixel reward gets further than one score
      # per image (toy_color, the same lr)
      color) run color "seed=$SEEDS" experiment=pxpo_color algorithm=ddpo_sf,pxpo optimizer.lr=3e-5 ;;
      # why PXPO lost reward on toy_alignment: its class-balanced map against one weight per pixel
      alignment_map) run alignment_map "seed=$SEEDS" experiment=toy_small algorithm=pxpo \
        reward.pixel_map=balanced,agree ;;
      # do the small-scale curves rise later? 4x as long (96 epochs, 3,072 sampled images), 2 seeds
      long) run long "seed=0,1" experiment=toy_small algorithm=ddpo,prdp trainer.epochs=96 trainer.eval_every=24 \
        trainer.checkpoint_every=24 ;;
      *) echo "unknown study '$name': small, large, color, alignment_map or long" >&2 && exit 2 ;;
    esac
  done
done
