"""sft_lora_small: sft_small with LoRA adapters (rank 8 on every attention and FFN kernel).

  python launch.py --experiment=sft_lora_small
  python launch.py --experiment=sft_lora_small --config.train.init_from=runs/pretrain_small

Only the adapters are trained, and only they (and their Adam moments) are in the checkpoints;
--mode=generate / chat merge them into train.init_from's weights.

Result so far (2 shared CPU cores, from sft_small's 100-step pretraining): learns far slower than
full fine-tuning at these settings: answer loss 3.31 / 2.12 / 1.83 / 1.80 at steps 50 / 100 / 250
/ 300 (full FT: 2.20 / 1.16 / 0.78 / 0.66); the run was stopped at step 300 for time, so exact
match is not measured yet. Tune learning_rate / alpha before relying on it.
"""

from experiments import sft_small


def get_config():
  c = sft_small.get_config()
  c.lora.update(rank=8, alpha=16.0)
  c.train.update(learning_rate=5e-3, weight_decay=0.0)
  return c
