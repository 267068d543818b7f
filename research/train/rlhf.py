"""The whole post-training pipeline in one workdir: pretrain -> SFT -> reward model -> PPO, and
DPO from the same SFT model, each stage in a subfolder (resumed, or skipped when done), the
stage configs those of `earlier.{sft,reward,ppo,dpo}` (research/train/stages.py).

It ends with a comparison of the policies on the held-out prompts: true task accuracy of greedy
replies, the normalised RM reward of those replies, and the KL (nats per response, sampled at
ppo.temperature) to the SFT reference: <workdir>/results.{json,md} and rlhf.png.
"""

import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from research import decoding
from research import rl
from research import tokenizers
from research.data import sft as sft_data
from research.data import synthetic
from research import runs
from research.train import stages

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

STAGES = ('sft', 'reward', 'ppo', 'dpo')


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature'))
def policy_stats(model: nn.Module, params: Any, ref_params: Any, rm: rl.RewardModel,
                 prompts: jnp.ndarray, prompt_mask: jnp.ndarray, key: jax.Array, *,
                 max_new_tokens: int, temperature: float, eos_id: int, pad_id: int
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """For left-padded prompts [batch, prompt_len]: greedy replies [batch, max_new_tokens], their
  rewards [batch], and the KL to the reference [batch] (sum over a sampled response of
  log p - log p_ref, at `temperature`)."""
  sample = functools.partial(decoding.sample, model, params, prompts, prompt_mask, key,
                             max_new_tokens=max_new_tokens, top_k=0, top_p=1.0, eos_id=eos_id,
                             pad_id=pad_id)
  greedy = sample(temperature=0.0)
  rewards = rm.score(*rl.join(prompts, prompt_mask, greedy, eos_id)[:3])
  sampled = sample(temperature=temperature)
  tokens, positions, segments, mask = rl.join(prompts, prompt_mask, sampled, eos_id)

  def logp(p):
    logits, _ = model.apply({'params': p}, tokens, positions, segments)
    return rl.token_logprobs(rl.response_window(logits, max_new_tokens), sampled, temperature)[0]

  return greedy, rewards, ((logp(params) - logp(ref_params)) * mask).sum(1)


def evaluate(config: ml_collections.ConfigDict, workdir: str, ref_params: Any,
             rm: rl.RewardModel, tok: tokenizers.Tokenizer,
             held_out: Sequence[sft_data.Record]) -> dict[str, float]:
  """Held-out accuracy, mean RM reward and mean KL to the reference of the policy in `workdir`."""
  _, _, model, params = runs.load_trained(workdir)
  prompts, mask = decoding.left_pad(
      [decoding.chat_prompt(tok, r.messages[:-1]) for r in held_out], tok.pad_id)
  greedy, rewards, kl = jax.device_get(policy_stats(
      model, params, ref_params, rm, prompts, mask, jax.random.key(config.seed),
      max_new_tokens=config.ppo.max_new_tokens, temperature=config.ppo.temperature,
      eos_id=tok.eos_id, pad_id=tok.pad_id))
  right = [synthetic.matches(tok.decode(g), r.messages[-1]['content'])
           for g, r in zip(greedy, held_out)]
  return {'accuracy': float(np.mean(right)), 'rm_reward': float(rewards.mean()),
          'kl_to_sft': float(kl.mean())}


def write_report(workdir: str, rows: dict[str, dict[str, float]]) -> str:
  """results.json, results.md (returned) and rlhf.png of {policy: metrics}."""
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  lines = ['| policy | held-out accuracy | RM reward (normalised) | KL to SFT (nats) |',
           '|---|---|---|---|']
  lines += [f'| {name} | {r["accuracy"]:.1%} | {r["rm_reward"]:+.3f} | {r["kl_to_sft"]:.3f} |'
            for name, r in rows.items()]
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in zip(axes, ('accuracy', 'rm_reward'),
                            ('held-out exact match', 'RM reward of greedy replies')):
    ax.bar(list(rows), [r[key] for r in rows.values()], color='tab:blue')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis='y')
  kl = ', '.join(f'{n} {r["kl_to_sft"]:.2f}' for n, r in rows.items() if n in ('ppo', 'dpo'))
  fig.suptitle(f'policies on held-out prompts (KL to SFT, nats: {kl})')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'rlhf.png'), dpi=110)
  plt.close(fig)
  return table


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compares the policies of the stages run in subfolders of `workdir` (run first, as the
  stage's needs) on the held-out prompts PPO trains on."""
  runs_ = {name: os.path.join(workdir, name) for name in ('sft', 'ppo', 'dpo')}
  pretrained = os.path.join(runs_['sft'], 'pretrain')
  if os.path.exists(os.path.join(pretrained, 'config.json')):
    runs_ = {'pretrain': pretrained, **runs_}
  tok, rm = runs.load_reward(os.path.join(workdir, 'reward'))
  ppo = stages.earlier_config(config, 'ppo')
  _, held_out = sft_data.load_records(ppo)  # The task PPO trains on (sft.kinds may be a subset).
  _, _, _, ref_params = runs.load_trained(runs_['sft'])
  rows = {name: evaluate(ppo, d, ref_params, rm, tok, held_out) for name, d in runs_.items()}
  if jax.process_index() == 0:
    print(write_report(workdir, rows), flush=True)
    runs.write_summary(workdir, {'finished': True, **{f'{n}/{k}': v for n, r in rows.items()
                                                       for k, v in r.items()}})
  return rows


STAGE = stages.Stage(
    name='rlhf', train=train, needs=tuple(stages.Need(name, '') for name in STAGES),
    not_generative='the comparison of an RLHF pipeline\'s policies; generate from one of its '
    'stages (e.g. --workdir=<this>/ppo).', reads=('sft', 'pairs'))
