#!/usr/bin/env bash
# Toy data with exact edge maps as control images, and its feature cache (control latents included).
# 3,000 scenes are written; the first 1,000 are extracted (the extraction of all 3,000 took ~4 min
# per 500 on the shared CPU, past the experiment's budget).
#   bash experiments/controlnet/data.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-/tmp/cn_exp}
TE=$(python -c "from pixsigma.text import minilm_path; print(minilm_path())")
VAE=pixsigma/assets/default_model/vae
[ -f "$RUN/data/data_info.json" ] || python -c "
import logging; logging.basicConfig(level=logging.INFO)
from pixsigma.toy.render import write_dataset
write_dataset('$RUN/data', 3000, seed=7, size=64, control='edges')"
python -c "
import json; json.dump(json.load(open('$RUN/data/data_info.json'))[:1000], open('$RUN/data/data_info_1000.json', 'w'))"
OMP_NUM_THREADS=1 pixsigma extract "$RUN/data/data_info_1000.json" --cache "$RUN/cache-1000" --vae "$VAE" --text-encoder "$TE" \
    --resolution 64 --max-tokens 80 --patch-size 1 --batch-size 64 --shard-size 500 --device cpu
