#!/usr/bin/env bash
# Trains the shipped default model from nothing, weak-to-strong, on 2 CPU cores:
#   synthetic data → toy VAE → stage 1 at 32px → adapt resolution → stages 2 and 2b at 64px
#   → stage 2c (the same network fine-tuned from ε- to v-prediction) → adapt kv-compress (deep
#   half, conv R=2) → stage 3 and its warm restarts 3b and 3c → stage 4, one long fine-tune →
#   → its LCM variant (`pixsigma distill lcm`) → held-out adherence evaluation → `pixsigma ship`
#   into pixsigma/assets/default_model (weights, the LCM variant, VAE, model index and model card;
#   the logs and reports stay in runs/toy).
# Every step skips what is already done and every training stage resumes (--resume), so a
# killed run is continued by running this script again. Logs go to runs/toy/*.log.
#   bash scripts/train_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/toy
mkdir -p "$RUN"
TE=$(python -c "from pixsigma.text import minilm_path; print(minilm_path())")
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

[ -f "$RUN/data/data_info.json" ] || python -c "
import logging; logging.basicConfig(level=logging.INFO)
from pixsigma.toy.render import write_dataset
write_dataset('$RUN/data', 10000, seed=1, size=64)"

# the VAE: 1500 steps at lr 1e-3, then 1000 more at 5e-4 (cosine decay within each run)
[ -f "$RUN/vae_a/config.json" ] || pixsigma train-vae "$RUN/vae_a" --steps 1500 --batch-size 16 2>&1 | tee "$RUN/vae_a.log"
[ -f "$RUN/vae/config.json" ] || pixsigma train-vae "$RUN/vae" --init-from "$RUN/vae_a" --steps 1000 --batch-size 16 --lr 5e-4 2>&1 | tee "$RUN/vae_b.log"
# then the decoder alone, objects weighted 4× (thin cross arms of small crosses came back as
# diamonds): the encoder and scaling factor stay identical, so the caches below stay valid
[ -f "$RUN/vae_dec/config.json" ] || pixsigma train-vae "$RUN/vae_dec" --init-from "$RUN/vae" --decoder-only --object-weight 4 \
    --steps 1500 --batch-size 16 --lr 3e-4 2>&1 | tee "$RUN/vae_dec.log"

pixsigma extract --config configs/toy/stage1_32px.toml --text-encoder "$TE" --patch-size 1 --batch-size 64 2>&1 | tee "$RUN/extract32.log"
pixsigma train configs/toy/stage1_32px.toml --resume 2>&1 | tee -a "$RUN/stage1.log"

[ -f "$RUN/stage2_init.safetensors" ] || pixsigma adapt resolution "$RUN/stage1/model.safetensors" "$RUN/stage2_init.safetensors" --resolution 64 --vae-factor 4
pixsigma extract --config configs/toy/stage1_32px.toml --cache "$RUN/cache-64" --resolution 64 --text-encoder "$TE" --patch-size 1 --batch-size 64 2>&1 | tee "$RUN/extract64.log"
pixsigma train configs/toy/stage2_64px.toml --resume 2>&1 | tee -a "$RUN/stage2.log"
pixsigma train configs/toy/stage2b_64px.toml --resume 2>&1 | tee -a "$RUN/stage2b.log"
pixsigma train configs/toy/stage2c_vpred.toml --resume 2>&1 | tee -a "$RUN/stage2c.log"

[ -f "$RUN/stage3_init.safetensors" ] || pixsigma adapt kv-compress "$RUN/stage2c/model.safetensors" "$RUN/stage3_init.safetensors" --layers deep --operator conv --ratio 2
pixsigma train configs/toy/stage3_kv.toml --resume 2>&1 | tee -a "$RUN/stage3.log"
# stages 3b and 3c: warm restarts of the KV fine-tune (each a fresh AdamW at 2e-4, cosine to 1e-5)
for s in 3b 3c; do
    pixsigma train configs/toy/stage${s}_kv.toml --resume 2>&1 | tee -a "$RUN/stage$s.log"
done
# stage 4: 4,000 steps at peak lr 3e-4 from the stage-3c EMA weights
pixsigma train configs/toy/stage4_long.toml --resume 2>&1 | tee -a "$RUN/stage4.log"
FINAL="$RUN/stage4/model.safetensors"
# the LCM variant (`pixsigma generate --fast`): latent consistency distillation of the final model
pixsigma distill lcm configs/toy/lcm.toml --resume --set "data.text_encoder=\"$TE\"" 2>&1 | tee -a "$RUN/lcm.log"
# held-out adherence (240 prompts × 4 seeds; transformer in bf16 for speed): the final model at
# 20 and 10 steps, and the model before the KV-compression stage at 20 steps
pixsigma eval adherence --steps 20 --seeds 4 --dtype bf16 --transformer "$FINAL" \
    --json "$RUN/adherence_20.json" 2>&1 | tee "$RUN/adherence_20.log"
pixsigma eval adherence --steps 10 --seeds 4 --dtype bf16 --transformer "$FINAL" \
    --json "$RUN/adherence_10.json" 2>&1 | tee "$RUN/adherence_10.log"
pixsigma eval adherence --steps 20 --seeds 4 --dtype bf16 --transformer "$RUN/stage2c/model.safetensors" \
    --json "$RUN/adherence_pre_kv.json" 2>&1 | tee "$RUN/adherence_pre_kv.log"

# into the package, keeping the card of the model this recipe makes (print its table from the
# reports above with scripts/adherence_table.py and update the card if they differ)
pixsigma ship --vae "$RUN/vae_dec" --transformer "$FINAL" --variant lcm="$RUN/lcm/model.safetensors" \
    --model-card pixsigma/assets/default_model/MODEL_CARD.md
