"""reward_small: a reward model (sft_small's GPT + a scalar head) on preference pairs of the
built-in task's sorting questions: the right answer against a nearly right one (one digit off by
one or copied from its neighbour, still sorted, or two digits swapped) or another problem's
answer.

  python launch.py --experiment=reward_small            # trains sft_small in <workdir>/sft first
  python launch.py --experiment=reward_small --config.train.init_from=runs/sft_small
  python launch.py --experiment=reward_small --config.reward.path=pairs.jsonl

Besides the hand-made pairs, the SFT policy answers 48000 train questions (reward.policy_pairs,
at ppo.temperature) and each wrong reply, checked against the right answer, becomes a rejected
answer: ~15k on-policy negatives, as labellers would rank the model's own samples.

Held-out pairwise accuracy goes to <workdir>/reward.json, with policy_pair_accuracy: how often a
right reply of the SFT policy to a held-out question scores above a wrong reply to the same
question (4 samples per question); the reward normalisation (SFT samples -> mean 0, std 1) to
reward_norm.json.

Why sorting only (sft.kinds): trained on all five kinds (2026-11-28) the model was at chance on
the held-out pairs of addition (54.5%), subtraction (51.9%) and counting (53.9%) - a 1.8M
parameter model whose policy adds right 2.5% of the time cannot tell 85 from 86 - so PPO had
nothing to learn from there.

Why on-policy negatives: pair accuracy on hand-made negatives overstated what PPO gets. With
hand-made pairs alone (600 steps) the model reached 91.7% held out, yet ranked the policy's own
right replies above its wrong ones only 74% of the time (same prompt) and PPO against it gained
nothing (83.5% -> 84.0%). The policy's mistakes are sorted lists with one digit changed, often
a digit copied from its neighbour ("3 6 9 9" for "3 6 8 9"), which only counting can catch. Same
SFT policy, 8 samples for each of 200 held-out questions, pair accuracy on its own replies:
hand-made pairs 74.4%; + 16000 questions' wrong replies, 1200 steps 86.0%; + 48000, 2000 steps
94.7% (PPO against it: 83.5% -> 92.0%). Copied-digit near misses were added to the hand-made
ones after these runs.

Measured (inside rlhf_small, 2 CPU cores, seed 0, 2026-12-02): 9 min 48 s (2000 steps at 32
pairs); held-out pair accuracy 95.6% (384 pairs); on the SFT policy's own replies (64.7% right)
98.7%.
"""

from experiments import sft_small
from research import config as config_lib


def get_config():
  c = sft_small.get_config()
  c.stage = 'reward'
  c.sft.kinds = ('sort',)  # The pairs: see the docstring.
  c.reward.policy_pairs = 48000  # ~15k wrong replies of the SFT policy: see the docstring.
  c.train.update(steps=2000, batch_size=32, seq_len=32, learning_rate=1e-3, warmup_steps=40,
                 weight_decay=0.0, eval_every=250, eval_batches=8, checkpoint_every=500,
                 log_every=50)
  c.earlier.sft = config_lib.earlier_overrides(sft_small.get_config(), c)
  return c
