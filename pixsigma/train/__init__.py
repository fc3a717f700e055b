"""Training: configs, the loop, checkpoints and the weak-to-strong transitions."""

from pixsigma.train.config import STAGES, TrainConfig, config_from_dict, load_config
from pixsigma.train.loop import train, train_from_file
