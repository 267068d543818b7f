"""pretrain_moe_small: pretrain_small's GPT, narrowed, with every FFN a noisy top-2-of-8 MoE.

  python launch.py --experiment=pretrain_moe_small

Every block's FFN is 8 experts of width 2 * d_model, 2 of which run per token (Shazeer et al.
2017): the active parameters of a dense model with ffn_multiplier 4, at 4x its FFN parameters.
bench/moe_vs_dense.py trains both for the same steps, 2 seeds each.

Runtime and result on 2 CPU cores: to be measured.
"""

from experiments import pretrain_small


def get_config():
  c = pretrain_small.get_config()
  c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=128, ffn_multiplier=2.0,
                 moe_every=1, num_experts=8, moe_top_k=2)
  c.train.update(steps=200, batch_size=16, seq_len=128, warmup_steps=20, eval_every=100,
                 checkpoint_every=100, log_every=20)
  return c
