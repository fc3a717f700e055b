"""Export a ControlNet run's latest checkpoint (its EMA, or --model) as a ControlNet-only file:
for a run cut by a time budget before its own export.

    python experiments/controlnet/export_checkpoint.py RUN BASE OUT.safetensors [--model]
"""

import argparse

from safetensors.torch import load_file

from pixsigma.model.checkpoint import load_transformer
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.model.controlnet_checkpoint import count_blocks, save_controlnet
from pixsigma.train.checkpointing import latest_checkpoint

p = argparse.ArgumentParser()
p.add_argument("run")
p.add_argument("base")
p.add_argument("out")
p.add_argument("--model", action="store_true", help="the trained weights instead of the EMA")
a = p.parse_args()
ck = latest_checkpoint(a.run)
weights = load_file(ck / ("model.safetensors" if a.model else "ema.safetensors"))
net = ControlNetTransformer(load_transformer(a.base), count_blocks(weights, str(ck)))
net.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in weights.items()})
save_controlnet(net, a.out, extra_metadata={"pixsigma_checkpoint": ck.name})
print(f"exported {ck} -> {a.out}")
