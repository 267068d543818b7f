"""pretrain_moe_small: pretrain_small's GPT, narrowed, with every FFN a noisy top-2-of-8 MoE.

  python launch.py --experiment=pretrain_moe_small

Every block's FFN is 8 experts of width 2 * d_model, 2 of which run per token (Shazeer et al.
2017): the active parameters of a dense model with ffn_multiplier 4, at 4x its FFN parameters.

Runtime and result on 2 CPU cores: 1 min 20 s end to end on a quiet machine (2026-12-02; 1 min
27 s with the one-hot dispatch einsums before the gathers; 3.5-4.5 minutes when other jobs
shared the cores); eval loss 2.115 / 2.096 (seeds 0 / 1) after 400 steps, with every expert of
every layer getting 11.1-14.2% of the routed tokens (uniform 12.5%; the acceptance bounds are
1/(4M) = 3.1% and 4/M = 50%) and 0.5-3.5% of the routed (token, expert) pairs dropped.
tests/test_moe.py's slow test checks it.

Dense vs MoE at equal active parameters (843k vs 835k: the router's 8k) and 400 steps:

  python bench/moe_vs_dense.py      # 12.8 minutes for the 4 runs on the same shared machine

  run    params   active  eval loss (seed 0, seed 1)  mean
  moe    2.42M    843k    2.1148, 2.0956              2.1052
  dense  835k     835k    2.1107, 2.1054              2.1081

A tie at this size and length: the 0.003 gap is under the seed spread (0.019 for the MoE).
"""

from experiments import pretrain_small


def get_config():
  c = pretrain_small.get_config()
  c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=128, ffn_multiplier=2.0,
                 moe_every=1, num_experts=8, moe_top_k=2)
  c.train.update(steps=400, batch_size=16, seq_len=128, warmup_steps=30, eval_every=100,
                 checkpoint_every=100, log_every=20)
  return c
