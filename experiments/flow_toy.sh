#!/usr/bin/env bash
# Every algorithm on the flow toy (model=toy_flow, sampler=flow_sde): one fixed-seed run each, 24 epochs,
# evaluated before and after on the training prompts (paired gain ± SE over prompts, in each run's
# console.log and the summary below). Settings: conf/tuning/toy_flow_*.yaml and, on toy_relations,
# conf/recipe/toy_flow_toy_relations_*.yaml (the first 3 of 10 steps stochastic).
#   bash experiments/flow_toy.sh            # outputs/flow_toy/<algorithm>; 11.5 min for the four on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/flow_toy}
common=(model=toy_flow sampler=flow_sde seed=0 trainer.epochs=24 trainer.eval_every=24 trainer.checkpoint_every=24
        "~dataset@eval_datasets.unseen" "paths.output_root=$OUT" trainer.progress_bar=false)
run() {  # name, overrides...
  local name=$1; shift
  python -m rlft "${common[@]}" run_name="$name" "$@" > /dev/null
  grep -h "evaluation reward on seen" "$OUT/$name/console.log" | sed "s/^/$name: /"
}
# toy_alignment on the 8 relation prompts x 4 images (the default prompt set and reward)
run ddpo algorithm=ddpo trainer.eval_images_per_prompt=4
run prdp algorithm=prdp trainer.eval_images_per_prompt=4
run grpo algorithm=grpo trainer.eval_images_per_prompt=4
# PXPO on its per-pixel colour reward (toy_color, toy_small), 16 evaluation prompts x 2
run pxpo experiment=pxpo_color trainer.eval_num_prompts=16 trainer.eval_images_per_prompt=2
