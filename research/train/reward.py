"""Reward model: an SFT (or pretrained) decoder with a scalar head read at the last token,
trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

Starts from `train.init_from`, else trains `earlier.sft` in <workdir>/sft first. After training,
a gain and bias are fitted so that the rewards of the SFT policy's own samples have mean 0 and
std 1 (Stiennon et al. 2020); they are stored in <workdir>/reward_norm.json and applied by `load`.
With the built-in pairs, `reward.policy_pairs` adds on-policy negatives: the SFT policy's wrong
replies (checked against the right answers) to that many train problems, each against the right
answer, as labellers would rank the model's own samples.

Held-out pairwise accuracy (overall and per task kind) goes to <workdir>/reward.json; with the
built-in pairs also how often a right reply of the SFT policy to a held-out prompt scores above a
wrong reply to the same prompt: the figure that decides whether PPO can learn from the reward,
which pair accuracy on hand-made negatives can overstate.
"""

import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import decoding
from research import perf
from research import rl
from research import tokenizers
from research.data import preferences
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn.transformer import DecoderLM, ScalarLM, init_decoder, init_scalar_head
from research import runs
from research.train import loop, stages

POLICY_SAMPLES_PER_PROMPT = 4  # For the pair accuracy on the SFT policy's own replies.
SAMPLING_BATCH = 256  # Prompts answered at once by `policy_samples`.


def pair_scores(model: ScalarLM, params: Any, batch: dict) -> jnp.ndarray:
  """Rewards [pairs, 2] (chosen, rejected) of a batch of `preferences.encode_pairs` rows."""
  tokens = batch['tokens']
  n, _, length = tokens.shape
  segments = (jnp.arange(length) < batch['length'][..., None]).astype(jnp.int32)
  return rl.last_token_scores(model, params, tokens.reshape(2 * n, length), None,
                           segments.reshape(2 * n, length)).reshape(n, 2)


def pair_metrics(scores: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
  """Bradley-Terry loss of scores [pairs, 2] and its metrics."""
  margin = scores[:, 0] - scores[:, 1]
  return -jax.nn.log_sigmoid(margin).mean(), {
      'accuracy': (margin > 0).mean(), 'margin': margin.mean(), 'reward_mean': scores.mean(),
      'reward_std': scores.std()}


@functools.partial(jax.jit, static_argnames=('policy', 'max_new_tokens', 'temperature'))
def sample_and_score(policy: nn.Module, policy_params: Any, reward: rl.RewardModel | None,
                     prompts: jnp.ndarray, prompt_mask: jnp.ndarray, key: jax.Array, *,
                     max_new_tokens: int, temperature: float, eos_id: int, pad_id: int
                     ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """Responses [batch, max_new_tokens] sampled from `policy` and their rewards [batch] (None
  without a reward model)."""
  responses = decoding.sample(policy, policy_params, prompts, prompt_mask, key,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                              top_p=1.0, eos_id=eos_id, pad_id=pad_id)
  if reward is None:
    return responses, None
  tokens, positions, segments, _ = rl.join(prompts, prompt_mask, responses, eos_id)
  return responses, reward.score(tokens, positions, segments)


def prompt_batches(tok: tokenizers.Tokenizer, prompts: Sequence[list[dict[str, str]]],
                   batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Chat prompts (message lists) -> left-padded (tokens, mask) batches of batch_size (the last
  one filled up with the first prompts), all of one length."""
  ids = [decoding.chat_prompt(tok, p) for p in prompts]
  ids += [ids[i % len(ids)] for i in range(-len(ids) % batch_size)]
  tokens, mask = decoding.left_pad(ids, tok.pad_id)
  return [(tokens[i:i + batch_size], mask[i:i + batch_size])
          for i in range(0, len(ids), batch_size)]


def policy_samples(config: ml_collections.ConfigDict, policy: nn.Module, policy_params: Any,
                   tok: tokenizers.Tokenizer, prompts: Sequence[list[dict[str, str]]],
                   reward: rl.RewardModel | None = None, seed: int = 0
                   ) -> tuple[list[str], np.ndarray | None]:
  """The policy's replies to `prompts` (sampled as PPO will: ppo.temperature and
  ppo.max_new_tokens) and, given a reward model, their rewards [len(prompts)]."""
  key = jax.random.fold_in(jax.random.key(config.seed), seed)
  replies, scores = [], []
  batch_size = min(SAMPLING_BATCH, len(prompts))
  for i, (tokens, mask) in enumerate(prompt_batches(tok, prompts, batch_size)):
    r, s = sample_and_score(policy, policy_params, reward, tokens, mask, jax.random.fold_in(key, i),
                            max_new_tokens=config.ppo.max_new_tokens,
                            temperature=config.ppo.temperature, eos_id=tok.eos_id,
                            pad_id=tok.pad_id)
    replies += [tok.decode(x) for x in np.asarray(r)]
    scores.append(s)
  if reward is None:
    return replies[:len(prompts)], None
  return replies[:len(prompts)], np.concatenate(jax.device_get(scores))[:len(prompts)]


def policy_pairs(config: ml_collections.ConfigDict, policy: nn.Module, policy_params: Any,
                 tok: tokenizers.Tokenizer) -> list[preferences.Pair]:
  """On-policy negatives: the policy answers reward.policy_pairs train problems of the built-in
  task; each wrong reply (by the checker) becomes a pair (right answer, that reply)."""
  problems = synthetic.problems('train', config.reward.policy_pairs, config.seed + 2,
                                config.sft.kinds)
  replies, _ = policy_samples(config, policy, policy_params, tok,
                              [[{'role': 'user', 'content': p.prompt}] for p in problems], seed=2)
  return [preferences.Pair(p.kind, [{'role': 'user', 'content': p.prompt}], p.answer, r)
          for p, r in zip(problems, replies) if not synthetic.matches(r, p.answer)]


def policy_pair_accuracy(scores: np.ndarray, correct: np.ndarray) -> float:
  """P(a right reply scores above a wrong reply to the same prompt), over all such pairs (ties
  count half), of scores and checks [samples, prompts]; nan without any. Within prompts, as the
  Bradley-Terry loss and PPO's advantages (against a prompt-aware value) use rewards; across
  prompts the rewards carry arbitrary per-prompt offsets."""
  wins = pairs = 0.0
  for s, c in zip(scores.T, correct.T):
    right, wrong = s[c], s[~c]
    wins += np.sum((right[:, None] > wrong[None]) + 0.5 * (right[:, None] == wrong[None]))
    pairs += len(right) * len(wrong)
  return float(wins / pairs) if pairs else float('nan')


def make_task(config: ml_collections.ConfigDict, model: ScalarLM, init_params,
              train_rows: dict[str, np.ndarray], held_rows: dict[str, np.ndarray]) -> loop.Task:
  """The Bradley-Terry task on `preferences.encode_pairs` rows; init_params(key) -> params."""
  t = config.train
  micro_batch = config_lib.micro_batch(config)

  def loss_fn(params, batch, key):
    del key  # No dropout in the reward model.
    return pair_metrics(pair_scores(model, params, batch))

  def eval_fn(params, batch):
    loss, metrics = pair_metrics(pair_scores(model, params, batch))
    return {'loss': loss, **metrics}

  train_batch, eval_batches = sft_data.row_batches(
      train_rows, held_rows, micro_batch, config.seed, len(held_rows['tokens']) // micro_batch)
  return loop.Task(
      init_params=init_params,
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=train_batch,
      eval_batches=eval_batches,
      tokens_per_step=t.batch_size * 2 * t.seq_len,
      flops_per_token=lambda params: perf.model_flops_per_token(config.model, params['lm'],
                                                                t.seq_len))


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, loop.Batch]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  rows = preferences.placeholder_rows(config.train.batch_size, config.train.seq_len)
  init = lambda key: init_scalar_head(cfg, key, init_decoder(DecoderLM(cfg), key))
  task = make_task(config, ScalarLM(cfg), init, rows, rows)
  return task, task.train_batch(0, 0, slice(None))


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains the reward model in `workdir` (resuming), then fits and saves its normalisation."""
  tok, base = runs.init_from(config, workdir)
  cfg = config_lib.model_config(config, tok.vocab_size)
  model = ScalarLM(cfg)
  train, held_out = preferences.load_pairs(config)
  _, _, policy, policy_params = runs.load_trained(config.train.init_from)
  if config.reward.policy_pairs:
    on_policy = policy_pairs(config, policy, policy_params, tok)
    print(f'{len(on_policy)} wrong replies of the SFT policy to {config.reward.policy_pairs} train '
          'problems added as rejected answers', flush=True)
    train += on_policy
  t = config.train
  train_rows, train = preferences.encode_pairs(tok, train, t.seq_len)
  held_rows, held_out = preferences.encode_pairs(tok, held_out, t.seq_len)
  task = make_task(config, model, lambda key: init_scalar_head(cfg, key, base), train_rows,
                   held_rows)
  result = loop.run(config, workdir, task)
  score_fn = jax.jit(functools.partial(pair_scores, model))
  scores = np.concatenate([np.asarray(score_fn(result.params, b)) for b in task.eval_batches])
  right = scores[:, 0] > scores[:, 1]
  kinds = [p.where for p in held_out][:len(right)]
  report = {'held_out_accuracy': float(right.mean()), 'pairs': int(len(right)),
            **{f'accuracy/{k}': float(np.mean([r for r, w in zip(right, kinds) if w == k]))
               for k in sorted(set(kinds) & set(synthetic.KINDS))}}
  print(f'reward model held-out pairwise accuracy: {report}', flush=True)
  # Normalisation: the rewards of the SFT policy's own samples get mean 0 and std 1.
  trained = rl.RewardModel(model, result.params, 1.0, 0.0)
  n = config.reward.normalise_samples
  _, raw = policy_samples(config, policy, policy_params, tok, [p.prompt for p in train[:n]],
                          trained)
  gain = 1.0 / max(float(raw.std()), 1e-6)
  bias = -float(raw.mean()) * gain
  print(f'reward normalisation: gain {gain:.4g}, bias {bias:.4g}', flush=True)
  if not config.reward.path:  # Built-in pairs: the chosen answer is the right one, so the
    # policy's samples can be checked: does the reward rank its right replies above its wrong?
    some, k = held_out[:n], POLICY_SAMPLES_PER_PROMPT
    replies, raw = policy_samples(config, policy, policy_params, tok,
                                  [p.prompt for p in some] * k, trained, seed=1)
    correct = np.array([synthetic.matches(r, p.chosen) for r, p in zip(replies, some * k)])
    report.update(policy_samples_correct=float(correct.mean()),
                  policy_pair_accuracy=policy_pair_accuracy(raw.reshape(k, -1),
                                                            correct.reshape(k, -1)))
    print(f'SFT policy, {k} samples for each of {len(some)} held-out prompts ({correct.mean():.1%} '
          'right): a right reply scores above a wrong one to the same prompt in '
          f'{report["policy_pair_accuracy"]:.1%} of pairs', flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'reward.json'), 'w') as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(workdir, 'reward_norm.json'), 'w') as f:
      json.dump({'gain': gain, 'bias': bias}, f)
  return result


def sections() -> dict[str, ml_collections.ConfigDict]:
  # Bradley-Terry loss on preference pairs (also DPO's pairs).
  return {'reward': ml_collections.ConfigDict(dict(
      path='',  # '' = pairs of the built-in task (research/data/preferences.py); else a .jsonl.
      num_train=8000,  # Built-in pairs: train and held-out counts,
      num_held_out=400,
      held_out_fraction=0.05,  # a .jsonl: the share held out.
      normalise_samples=256,  # SFT-policy samples whose rewards are made mean 0, std 1.
      # Built-in pairs: also the SFT policy's wrong replies (at ppo.temperature) to this many
      # train problems, each against the right answer: on-policy negatives.
      policy_pairs=0,
  ))}


def check(config: ml_collections.ConfigDict) -> None:
  if config.reward.policy_pairs and config.reward.path:
    raise UserError(f'reward.policy_pairs={config.reward.policy_pairs} needs the built-in pairs '
                    f'(their answers are checked), not reward.path={config.reward.path!r}; set '
                    'one of them.')


STAGE = stages.Stage(
    name='reward', train=train, needs=(stages.Need('sft'),), sections=sections, check=check,
    step_spec=step_spec, reads=('sft', 'pairs'),
    not_generative='a reward model, which scores text but does not generate it; use an SFT, PPO '
    'or DPO run.')
