#!/usr/bin/env bash
# Data for teaching the shipped model a new color: 2,000 toy scenes (seed 21), half of them with
# one object (and its same-color group) in "lime", a color outside the training palette; the
# other half regular scenes, so the adapter keeps the old colors. Then the feature cache.
#   bash experiments/lora_concept/data.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/lora_concept}
TE=$(python -c "from pixsigma.text import minilm_path; print(minilm_path())")
[ -f "$RUN/data/data_info.json" ] || python -c "
from pixsigma.toy.render import write_dataset
write_dataset('$RUN/data', 2000, seed=21, size=64, new_color='lime', new_color_share=0.5)"
[ -f "$RUN/cache-64/meta.json" ] || OMP_NUM_THREADS=1 pixsigma extract "$RUN/data/data_info.json" --cache "$RUN/cache-64" \
    --vae pixsigma/assets/default_model/vae --text-encoder "$TE" --resolution 64 --max-tokens 80 --patch-size 1 --batch-size 64
