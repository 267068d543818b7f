"""pretrain_small: a 4-layer GPT on the Python standard library's own sources.

  python launch.py --experiment=pretrain_small

Measured on 2 CPU cores (2026-11-28, jax 0.10.2, float32): 6 min 36 s end to end, tokenizer and
data included, at ~4,000 tokens/s (~40% MFU). Final eval loss 1.693 nats/character (next-character
accuracy 54.5%; the unigram entropy of the val split is 3.345), so a run should end near 1.7.
"""

from research.config import default_config


def get_config():
  c = default_config()
  c.tokenizer.kind = 'char'
  c.model.update(num_layers=4, num_heads=6, d_model=192, max_len=128)
  c.train.update(steps=700, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=50,
                 eval_every=100, checkpoint_every=100, log_every=25)
  c.sampling.update(prompt='def ', max_new_tokens=120)
  return c
