#!/usr/bin/env bash
# The measured run: data and cache, 20 minutes of LoRA training on one thread, the export of
# the last checkpoint, the evaluation with and without the adapter, and the cost comparison
# against full fine-tuning. Run from the repository root: bash experiments/lora_concept/run.sh
set -euo pipefail
RUN=runs/lora_concept
TE=$(python -c "from pixsigma.text import minilm_path; print(minilm_path())")
export OMP_NUM_THREADS=1
bash experiments/lora_concept/data.sh "$RUN"
timeout 20m pixsigma train experiments/lora_concept/train.toml --set "data.text_encoder=\"$TE\"" \
    > "$RUN/train.log" 2>&1 || true
LAST=$(python -c "import json; print(json.load(open('$RUN/run/checkpoints/latest/state.json'))['step'])" 2>/dev/null \
    || ls "$RUN/run/checkpoints" | grep step- | sort | tail -1 | sed 's/step-0*//')
pixsigma train experiments/lora_concept/train.toml --set "data.text_encoder=\"$TE\"" --resume --max-steps "$LAST"
python experiments/lora_concept/evaluate.py "$RUN/run/lora.safetensors" --out experiments/lora_concept/results
python benchmarks/lora_training.py --rank 8 --repeats 3
