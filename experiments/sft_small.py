"""sft_small: pretrain_small's GPT fine-tuned (all weights) on the built-in verifiable questions.

  python launch.py --experiment=sft_small    # pretrains 100 steps first (fresh machine)
  python launch.py --experiment=sft_small --config.train.init_from=runs/pretrain_small
  python launch.py --experiment=sft_small --mode=chat    # then ask "What is 37 plus 48?"

Questions like "What is 37 plus 48?" -> "85" (research/data/synthetic.py: addition, subtraction,
unit conversion, sorting digits, counting a letter); the loss is on the answers only, examples
are packed 3-4 to a row. Held-out exact match of greedy replies before and after is printed and
written to <workdir>/exact_match.json. sft_lora_small trains LoRA adapters instead.

Measured on a quiet machine (2 CPU cores, 2026-11-28, seed 0; as the first stage of
rlhf_small): 6 min 11 s including its 100-step pretraining (1 min 08 s), ~4.3k tokens/s.
Held-out exact match (200 problems) 0.0 before -> 41.5% after 600 steps: convert 100%, sort
62.5%, count 37.5%, subtract 5%, add 2.5%. Below the 60% aim: addition and subtraction need more
steps (eval answer-token accuracy was still rising: 0.69 / 0.79 / 0.82 at steps 200 / 400 / 600).
Again on 2026-12-01 (another machine, AMD EPYC: float results differ, so training does): 6 min 44
s, 0.0 -> 46.0% (convert 100%, sort 77.5%, count 45%, subtract 5%, add 2.5%); on 200 held-out
sorting questions 83.5%. RoPE + SwiGLU instead (the better pretraining ablations): 32.5%.
On 2026-12-02 (AMD EPYC, after the throughput work): 2 min 44 s end to end, 0.0 -> 46.0%
(convert 100%, sort 75%, count 45%, subtract 7.5%, add 2.5%).
"""

from experiments import pretrain_small


def get_config():
  c = pretrain_small.get_config()
  c.stage = 'sft'
  c.train.update(steps=600, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=30,
                 eval_every=200, eval_batches=4, checkpoint_every=200, log_every=50)
  c.sft.pretrain.update(steps=100, warmup_steps=20)
  c.sampling.max_new_tokens = 32  # --mode=generate / chat: answers are short.
  return c
