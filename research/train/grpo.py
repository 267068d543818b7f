"""RL with verifiable rewards: group-relative policy optimisation (GRPO, Shao et al. 2024) and its
corrections (Dr. GRPO, DAPO, RLOO; `grpo.loss`, see rl.GROUP_LOSSES), without a value network.

One iteration (a step of the shared loop, research/train/loop.py; train.steps of them):
train.batch_size prompts drawn by (seed, step), sorted by length into buckets of
`grpo.bucket_prompts` that are each left-padded only to their own longest prompt; each prompt's
KV cache is computed once and repeated for its grpo.group_size sampled replies
(`decoding.sample_groups`, our own decoder over the very weights being trained, which also returns
the sampled tokens' log-probs) -> rewards (the weighted sum of `grpo.rewards`) -> group-relative
advantages -> grpo.epochs passes of clipped importance-ratio updates over shuffled minibatches of
grpo.minibatch_size replies. With grpo.epochs == 1 the sampler's log-probs are the old policy's;
else they are recomputed once after sampling. grpo.beta > 0 adds k3 KL to the starting policy
(the reference is then kept; at 0 it is not). DAPO's dynamic sampling (grpo.dynamic_sampling)
drops groups whose rewards are all equal and samples more prompts to refill the batch; its
overlong shaping (grpo.overlong_buffer > 0) penalises replies that run into max_new_tokens.

Rewards (`grpo.rewards`, weighted by `grpo.reward_weights`): 'checker' (1 if the reply is the
record's answer, research/data/synthetic.py), 'format' (1 if the reply ends with EOS), 'model'
(the normalised score of the reward run in grpo.reward_from), or 'module:function', a Python
function reward(prompt: str, completion: str, record: dict) -> float (e.g.
'experiments.grpo_small:reward').

Starts from train.init_from (the SFT run; else earlier.sft is trained in <root>/sft). Writes
results.json / results.md (held-out exact match per kind before and after) and grpo.png.
"""

import importlib
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import decoding
from research import metrics as metrics_lib
from research import parallel
from research import perf
from research import rl
from research import runs
from research import tokenizers
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn.transformer import DecoderLM, init_decoder
from research.train import loop, stages

RewardFn = Callable[[str, str, sft_data.Record, bool], float]


@flax.struct.dataclass
class Policy:
  """The policy model and grpo.* settings (static), for jitted functions."""
  model: DecoderLM = flax.struct.field(pytree_node=False)
  settings: tuple = flax.struct.field(pytree_node=False)  # sorted (key, value) of config.grpo

  @property
  def grpo(self) -> dict:
    return dict(self.settings)


def reply_logprobs(policy: Policy, params: Any, batch: dict) -> jnp.ndarray:
  """Log-probs [batch, resp_len] of the replies' tokens under `params`, at grpo.temperature."""
  logits, _ = policy.model.apply({'params': params}, batch['tokens'], batch['positions'],
                                 batch['segments'])
  resp = batch['responses']
  return rl.token_logprobs(rl.response_window(logits, resp.shape[1]), resp,
                           policy.grpo['temperature'])[0]


logprobs = jax.jit(reply_logprobs)


def grpo_loss(policy: Policy, params: Any, batch: dict) -> tuple[jnp.ndarray, dict]:
  """The group loss of a minibatch of replies (+ beta * k3 KL to the reference when beta > 0)."""
  g = policy.grpo
  logp = reply_logprobs(policy, params, batch)
  mask = batch['mask']
  loss, metrics = rl.group_policy_loss(logp, batch['old_logp'], batch['advantages'], mask,
                                       g['loss'], g['clip_low'], g['clip_high'])
  if g['beta'] > 0:
    kl = rl.masked_mean(rl.kl_estimate(logp, batch['ref_logp'], 'k3'), mask)
    loss, metrics = loss + g['beta'] * kl, {**metrics, 'kl': kl}
  return loss, metrics


def reward_functions(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer
                     ) -> list[tuple[str, float, RewardFn]]:
  """(name, weight, fn) of grpo.rewards; fn(prompt, reply, record, ended) -> float."""
  g = config.grpo
  out = []
  for name, weight in zip(g.rewards, g.reward_weights):
    if name == 'checker':
      fn = lambda p, reply, r, ended: float(synthetic.matches(reply, r.messages[-1]['content']))
    elif name == 'format':
      fn = lambda p, reply, r, ended: float(ended)
    elif name == 'model':
      reward_tok, rm = runs.load_reward(g.reward_from)
      if reward_tok.vocab_size != tok.vocab_size:
        raise UserError(f'grpo.reward_from={g.reward_from!r} reads another tokenizer; train the '
                        'reward model from this policy\'s SFT run.')
      score = jax.jit(lambda tokens: rm.score(*decoding_inputs(tokens, tok.pad_id)))
      length = config.model.max_len  # One shape: compiled once, whatever the reply's length.

      def fn(p, reply, r, ended, score=score, length=length):
        del p
        ids = (decoding.chat_prompt(tok, r.messages[:-1]) + tok.encode(reply)
               + ([tok.eos_id] if ended else []))[:length]
        row = np.full((1, length), tok.pad_id, np.int32)
        row[0, :len(ids)] = ids
        return float(score(row)[0])
    else:
      fn = user_function(name)
    out.append((name, float(weight), fn))
  return out


def decoding_inputs(tokens: jnp.ndarray, pad_id: int) -> tuple[jnp.ndarray, ...]:
  """(tokens, positions, segment ids) of right-padded rows [batch, len]."""
  segments = (tokens != pad_id).astype(jnp.int32)
  return tokens, jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0), segments


def user_function(name: str) -> RewardFn:
  """'module:function' as a reward function of (prompt, reply, record, ended)."""
  module, _, attr = name.partition(':')
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise UserError(f'grpo.rewards names {name!r}, which does not import ({e}); give checker, '
                    'format, model or module:function.') from None
  return lambda prompt, reply, record, ended: fn(prompt, reply, {
      'messages': record.messages, 'where': record.where})


def score_replies(fns: list[tuple[str, float, RewardFn]], prompts: list[str], replies: list[str],
                  records: list[sft_data.Record], ended: np.ndarray) -> dict[str, np.ndarray]:
  """{reward name: [n] values} and 'total' (the weighted sum); a function that raises or returns
  a non-number is one UserError naming the prompt."""
  out = {}
  for name, _, fn in fns:
    values = []
    for prompt, reply, record, e in zip(prompts, replies, records, ended):
      try:
        value = fn(prompt, reply, record, bool(e))
        value = float(value)
        if not np.isfinite(value):
          raise ValueError(f'{value} is not finite')
      except Exception as err:  # pylint: disable=broad-except (a user's function)
        raise UserError(f'reward {name!r} failed on the prompt {prompt!r} (reply {reply!r}): '
                        f'{type(err).__name__}: {err}; it must return a finite number.') from None
      values.append(value)
    out[name] = np.array(values, np.float32)
  out['total'] = sum(w * out[name] for name, w, _ in fns).astype(np.float32)
  return out


class Rollouts:
  """GRPO's rollout hook (`loop.Task.rollout`) and its minibatches (`loop.Task.train_batch`)."""

  def __init__(self, config: ml_collections.ConfigDict, policy: Policy,
               tok: tokenizers.Tokenizer, rewards: list[tuple[str, float, RewardFn]]):
    self.config, self.policy, self.tok, self.rewards = config, policy, tok, rewards
    records, _ = sft_data.load_records(config)
    self.records = [r for r in records if r.messages and r.messages[-1]['role'] == 'assistant']
    self.prompt_ids = [decoding.chat_prompt(tok, r.messages[:-1]) for r in self.records]
    self.prompt_len = max(len(p) for p in self.prompt_ids)
    g = config.grpo
    if self.prompt_len + g.max_new_tokens > config.model.max_len:
      raise UserError(f'prompts of {self.prompt_len} tokens + grpo.max_new_tokens='
                      f'{g.max_new_tokens} exceed model.max_len={config.model.max_len}; lower '
                      'grpo.max_new_tokens or use shorter prompts.')
    self.buffer, self.orders, self.sampled_tokens, self.sample_sec = {}, [], 0, 0.0

  def sample(self, params: Any, idx: np.ndarray, key: jax.Array) -> dict[str, np.ndarray]:
    """Replies to the prompts `idx`, bucketed by length: tokens and log-probs [n * G, T], and
    the prompts left-padded to the task's longest [n * G, prompt_len]."""
    g, t0 = self.config.grpo, time.perf_counter()
    order = sorted(idx, key=lambda i: len(self.prompt_ids[i]))
    parts = []
    for b in range(0, len(order), g.bucket_prompts):
      bucket = order[b:b + g.bucket_prompts]
      prompts, mask = decoding.left_pad([self.prompt_ids[i] for i in bucket], self.tok.pad_id,
                                        multiple=8)
      replies, logp = decoding.sample_groups(
          self.policy.model, params, prompts, mask, jax.random.fold_in(key, b),
          group=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
          eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
      parts.append((bucket, *parallel.to_host((replies, logp))))
    self.sample_sec += time.perf_counter() - t0
    rows = np.array([i for bucket, _, _ in parts for i in bucket])
    replies = np.concatenate([r for _, r, _ in parts])
    self.sampled_tokens += replies.size
    full, full_mask = decoding.left_pad([self.prompt_ids[i] for i in rows], self.tok.pad_id)
    pad = self.prompt_len - full.shape[1]
    full = np.pad(full, ((0, 0), (pad, 0)), constant_values=self.tok.pad_id)
    full_mask = np.pad(full_mask, ((0, 0), (pad, 0)))
    return {'index': rows, 'prompts': np.repeat(full, g.group_size, 0),
            'prompt_mask': np.repeat(full_mask, g.group_size, 0), 'responses': replies,
            'old_logp': np.concatenate([lp for _, _, lp in parts])}

  def rewards_of(self, rollout: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = self.config.grpo
    records = [self.records[i] for i in np.repeat(rollout['index'], g.group_size)]
    replies = [self.tok.decode(r) for r in rollout['responses']]
    ended = (rollout['responses'] == self.tok.eos_id).any(axis=1)
    prompts = [r.messages[-2]['content'] for r in records]
    scores = score_replies(self.rewards, prompts, replies, records, ended)
    if g.overlong_buffer:
      lengths = np.where(ended, np.argmax(rollout['responses'] == self.tok.eos_id, axis=1) + 1,
                         g.max_new_tokens)
      scores['overlong'] = rl.overlong_penalty(lengths, g.max_new_tokens, g.overlong_buffer)
      scores['total'] = scores['total'] + scores['overlong']
    scores['ended'] = ended.astype(np.float32)
    return scores

  def __call__(self, params: Any, frozen: Any, extra: Any, step: int) -> tuple[Any, dict]:
    t, g = self.config.train, self.config.grpo
    rng = np.random.default_rng([self.config.seed, step])
    key = jax.random.fold_in(jax.random.key(self.config.seed), step)
    pool = rng.permutation(len(self.records))
    rollout = self.sample(params, pool[:t.batch_size], key)
    scores = self.rewards_of(rollout)
    drawn, refills = t.batch_size, 0
    if g.dynamic_sampling:  # Refill with more prompts until batch_size groups are informative.
      keep = rl.keep_informative_groups(scores['total'].reshape(-1, g.group_size))
      while keep.sum() < t.batch_size and refills < g.max_refills and drawn < len(pool):
        more = self.sample(params, pool[drawn:drawn + t.batch_size],
                           jax.random.fold_in(key, 1 + refills))
        more_scores = self.rewards_of(more)
        rollout = {k: np.concatenate([rollout[k], more[k]]) for k in rollout}
        scores = {k: np.concatenate([scores[k], more_scores[k]]) for k in scores}
        keep = rl.keep_informative_groups(scores['total'].reshape(-1, g.group_size))
        drawn, refills = drawn + t.batch_size, refills + 1
      groups = np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])[:t.batch_size]
      rows = (groups[:, None] * g.group_size + np.arange(g.group_size)).ravel()
      informative = float(keep[groups].mean())
      rollout = {k: v[groups] if k == 'index' else v[rows] for k, v in rollout.items()}
      scores = {k: v[rows] for k, v in scores.items()}
    else:
      informative = float(rl.keep_informative_groups(
          scores['total'].reshape(-1, g.group_size)).mean())
    self.buffer = self.updates_buffer(params, frozen, rollout, scores)
    self.orders = [rng.permutation(len(self.buffer['mask'])) for _ in range(g.epochs)]
    metrics = {f'reward_{k}': float(v.mean()) for k, v in scores.items()}
    mask = self.buffer['mask']
    metrics.update(response_length=float(mask.sum(1).mean()), groups_informative=informative,
                   refills=float(refills))
    return extra, metrics

  def updates_buffer(self, params: Any, frozen: Any, rollout: dict, scores: dict) -> dict:
    """The arrays the updates read: joined sequences, mask, advantages, old (and reference)
    log-probs."""
    g = self.config.grpo
    tokens, positions, segments, mask = jax.device_get(rl.join(
        jnp.asarray(rollout['prompts']), jnp.asarray(rollout['prompt_mask']),
        jnp.asarray(rollout['responses']), self.tok.eos_id))
    adv = rl.group_advantages(jnp.asarray(scores['total'].reshape(-1, g.group_size)), g.loss)
    buffer = {'tokens': tokens, 'positions': positions, 'segments': segments,
              'responses': rollout['responses'], 'mask': mask,
              'advantages': np.asarray(adv).ravel(), 'old_logp': rollout['old_logp'] * mask}
    if g.epochs > 1:  # The sampler's log-probs are the old policy's only for the first pass.
      buffer['old_logp'] = self.logprobs_of(params, buffer) * mask
    if g.beta > 0:
      buffer['ref_logp'] = self.logprobs_of(frozen['ref'], buffer) * mask
    return buffer

  def logprobs_of(self, params: Any, buffer: dict) -> np.ndarray:
    size = self.config.grpo.minibatch_size
    keys = ('tokens', 'positions', 'segments', 'responses')
    return np.concatenate([
        parallel.to_host(logprobs(self.policy, params, {k: buffer[k][i:i + size] for k in keys}))
        for i in range(0, len(buffer['tokens']), size)])

  def batch(self, step: int, update: int, rows: slice) -> dict[str, np.ndarray]:
    """This process's rows of minibatch `update` of the step's replies."""
    del step
    size = self.config.grpo.minibatch_size
    epoch, m = divmod(update, len(self.buffer['mask']) // size)
    ids = self.orders[epoch][m * size:(m + 1) * size]
    return {k: v[ids][rows] for k, v in self.buffer.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Runs GRPO in `workdir` (resuming); writes results.json / results.md and grpo.png."""
  tok, start = runs.init_from(config, workdir)
  cfg = config_lib.model_config(config, tok.vocab_size)
  g, t = config.grpo, config.train
  settings = {**g.to_dict(), 'rewards': tuple(g.rewards),
              'reward_weights': tuple(g.reward_weights)}
  policy = Policy(DecoderLM(cfg), tuple(sorted(settings.items())))
  rollouts = Rollouts(config, policy, tok, reward_functions(config, tok))
  _, held_out = sft_data.load_records(config)
  results = {'before': sft_data.score(config, policy.model, start, tok, held_out)}
  print(f'held-out exact match before GRPO: {results["before"]}', flush=True)

  def evaluate(params):
    results['after'] = sft_data.score(config, policy.model, params, tok, held_out)
    return {'exact_match': results['after']['all'],
            **{f'exact_match_{k}': v for k, v in results['after'].items() if k != 'all'}}

  replies = t.batch_size * g.group_size
  task = loop.Task(
      init_params=lambda key: init_decoder(policy.model, key),
      start_params=jax.tree.map(jnp.copy, start) if g.beta > 0 else start,
      loss_fn=lambda params, batch, key, frozen=None: grpo_loss(policy, params, batch),
      eval_fn=None, eval_batches=[], evaluate=evaluate,
      train_batch=rollouts.batch, rollout=rollouts,
      frozen={'ref': start} if g.beta > 0 else None,
      updates_per_step=g.epochs * (replies // g.minibatch_size),
      rows_per_update=g.minibatch_size,
      tokens_per_step=g.epochs * replies * (rollouts.prompt_len + g.max_new_tokens),
      flops_per_token=lambda params: perf.model_flops_per_token(
          config.model, params, rollouts.prompt_len + g.max_new_tokens))
  result = loop.run(config, workdir, task)
  if jax.process_index() == 0:
    write_results(config, workdir, results, rollouts)
  return result


def write_results(config: ml_collections.ConfigDict, workdir: str, results: dict,
                  rollouts: Rollouts) -> None:
  """results.json, results.md (exact match per kind before / after) and grpo.png."""
  after = results.get('after', results['before'])
  speed = rollouts.sampled_tokens / max(rollouts.sample_sec, 1e-9)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({**results, 'sampled_tokens_per_sec': speed}, f, indent=2)
  lines = ['| kind | before | after |', '|---|---|---|']
  lines += [f'| {k} | {results["before"][k]:.1%} | {after[k]:.1%} |' for k in results['before']]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'GRPO ({config.grpo.loss}), held-out exact match; rollouts sampled at '
            f'{speed:,.0f} tokens/s\n\n' + '\n'.join(lines) + '\n')
  panels = {'held-out exact match': ('eval/exact_match',),
            'reward of the sampled replies': ('train/reward_total',)}
  metrics_lib.plot_panels(os.path.join(workdir, 'metrics.jsonl'),
                          os.path.join(workdir, 'grpo.png'), panels,
                          title=f'{config.grpo.loss} ({os.path.basename(os.path.normpath(workdir))}'
                          f', seed {config.seed})')


def sections() -> dict[str, ml_collections.ConfigDict]:
  # train.steps counts iterations; train.batch_size the prompts per iteration.
  return {'grpo': ml_collections.ConfigDict(dict(
      loss='grpo',  # One of rl.GROUP_LOSSES: grpo | dr_grpo | dapo | rloo.
      group_size=8,  # Replies per prompt.
      epochs=1,  # Passes over each iteration's replies,
      minibatch_size=32,  # in shuffled minibatches of this many replies.
      temperature=1.0,
      max_new_tokens=16,
      clip_low=0.2,  # The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO: 0.28 high).
      clip_high=0.2,
      beta=0.0,  # k3 KL to the starting policy; 0 = none (no reference kept).
      rewards=('checker',),  # checker | format | model | module:function, weighted:
      reward_weights=(1.0,),
      reward_from='',  # The reward run of the 'model' reward.
      dynamic_sampling=False,  # DAPO: drop all-equal groups, sample more prompts to refill,
      max_refills=4,  # at most this many times per iteration.
      overlong_buffer=0,  # DAPO: > 0 penalises replies within this many tokens of the limit.
      bucket_prompts=16,  # Prompts sampled together (sorted by length, padded per bucket).
  ))}


def check(config: ml_collections.ConfigDict) -> None:
  g, t = config.grpo, config.train
  if g.loss not in rl.GROUP_LOSSES:
    raise UserError(f'grpo.loss={g.loss!r} is not one of {rl.GROUP_LOSSES}.')
  if g.group_size < 2:
    raise UserError(f'grpo.group_size={g.group_size} must be >= 2 (advantages are relative to '
                    'the group).')
  if g.minibatch_size <= 0 or (t.batch_size * g.group_size) % g.minibatch_size:
    raise UserError(f'train.batch_size={t.batch_size} x grpo.group_size={g.group_size} replies '
                    f'must be a multiple of grpo.minibatch_size={g.minibatch_size}.')
  if len(g.rewards) != len(g.reward_weights) or not g.rewards:
    raise UserError(f'grpo.rewards={tuple(g.rewards)} and grpo.reward_weights='
                    f'{tuple(g.reward_weights)} must be as long as each other (at least one).')
  if 'model' in g.rewards and not g.reward_from:
    raise UserError("grpo.rewards has 'model': set grpo.reward_from to a reward run's workdir.")
  if t.grad_accum_steps != 1:
    raise UserError(f"train.grad_accum_steps={t.grad_accum_steps} does not apply to stage='grpo' "
                    '(it updates once per grpo.minibatch_size replies); set it to 1.')


STAGE = stages.Stage(name='grpo', train=train, sections=sections, check=check,
                     needs=(stages.Need('sft'),), reads=('sft',))
