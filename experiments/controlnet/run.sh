#!/usr/bin/env bash
# The measured run: data, 25 minutes of training (stopped at step 410), export of the last
# checkpoint's EMA, and the held-out evaluation with and without control (48 prompts x 2 seeds, 10 steps).
set -euo pipefail
RUN=/tmp/cn_exp
bash experiments/controlnet/data.sh "$RUN"
OMP_NUM_THREADS=1 nice -n 10 timeout 25m pixsigma train experiments/controlnet/train.toml || true
python experiments/controlnet/export_checkpoint.py "$RUN/run" pixsigma/assets/default_model/transformer/model.safetensors \
    "$RUN/controlnet.safetensors"
E=experiments/controlnet/eval.py
for k in 0 1; do
    OMP_NUM_THREADS=1 python $E "$RUN/controlnet.safetensors" --condition with --prompts 48 --seeds 2 --steps 10 --part $k/2 \
        --save "$RUN/eval_with_$k" &
done
OMP_NUM_THREADS=1 python $E --condition without --prompts 48 --seeds 2 --steps 10 --save "$RUN/eval_without" &
wait
python $E --save - --report "$RUN/eval_with_0" "$RUN/eval_with_1" --json experiments/controlnet/eval_with.json
python $E --save - --report "$RUN/eval_without" --json experiments/controlnet/eval_without.json
