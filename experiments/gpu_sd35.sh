#!/usr/bin/env bash
# One GPU, under 10 minutes: GRPO on Stable Diffusion 3.5 Medium's published transformer and VAE
# (random weights, rlft/sd3.py build_random_sd35_medium: nothing to download) with LoRA r 32 at 512 px
# in bf16, one GPU's share of Flow-GRPO's PickScore epoch (36 images: 4 groups of 9, 10 flow-SDE
# steps, CFG 4.5) with the JPEG reward in PickScore's place. Prints the rollout's images/s against a
# bare diffusers loop, one epoch split into sampling / reward / training, one evaluation and the
# peak GPU memory (rlft/bench.py, case sd35_medium_random:grpo). The first run writes the random
# pipeline (~5 GB in bf16) to $RLFT_CACHE (default ~/.cache/rlft).
#   bash experiments/gpu_sd35.sh [--resolution 1024]
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
time "${PYTHON:-python3}" -m rlft.bench --cases sd35_medium_random:grpo --steps 10 --batch 9 --repeat 2 "$@"
