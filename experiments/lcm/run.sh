#!/usr/bin/env bash
# LCM distillation of the shipped default model, then held-out adherence of LCM at 1/2/4/8 steps
# against DPM-Solver++ at 5/10/20 (transformer in bf16). Run from the repository root:
#   bash experiments/lcm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=runs/lcm
TE=$(python -c "from pixsigma.text import minilm_path; print(minilm_path())")
export OMP_NUM_THREADS=1
mkdir -p "$RUN"
[ -f "$RUN/data/data_info.json" ] || python -c "
from pixsigma.toy.render import write_dataset
write_dataset('$RUN/data', 3000, seed=1, size=64)"
[ -f "$RUN/cache-64/meta.json" ] || pixsigma extract "$RUN/data/data_info.json" --cache "$RUN/cache-64" \
    --vae pixsigma/assets/default_model/vae --text-encoder "$TE" --resolution 64 --max-tokens 80 --patch-size 1 --batch-size 64
nice -n 10 pixsigma distill lcm experiments/lcm/distill_default.toml --resume --set "data.text_encoder=\"$TE\"" \
    ${MAX_STEPS:+--max-steps $MAX_STEPS} 2>&1 | tee -a "$RUN/distill.log"
