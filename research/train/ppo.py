"""PPO for RLHF (Ouyang et al. 2022; details after Huang et al. 2024, "The N Implementation
Details of RLHF with PPO"): the SFT policy samples answers to the task's prompts, a reward model
scores them, and the policy is updated to raise the score while a per-token KL penalty keeps it
near the frozen SFT reference.

One iteration (train.steps of them): `train.batch_size` left-padded prompts -> responses sampled
at ppo.temperature and cut after the first EOS -> log-probs recomputed at that temperature by
the policy and the reference, values by the value model (the SFT model with a scalar head) ->
per-token rewards -beta * KL_t plus the normalised RM score on the last token (a response
without EOS scores -ppo.missing_eos_penalty instead: the reward model never saw such text, and
PPO found replies it scored high - 2026-12-02, seed 1: RM reward +1.5, KL 7 nats, accuracy 83.5%
-> 35% with the penalty merely subtracted) -> GAE advantages, whitened -> ppo.epochs passes of
clipped policy and value updates over shuffled minibatches. Rollout and update are jitted.

Starts from `train.init_from` (the SFT run; else `earlier.sft` is trained in <workdir>/sft) and
`ppo.reward_from` (else `earlier.reward` is trained in <workdir>/reward). With
ppo.reward='checker' the score is instead 1 for a reply that matches the record's answer exactly,
else 0 (a verifiable reward, as in RLVR): no reward model, and the upper bound of what a reward
model of that task can give PPO.

Logs per iteration the true task score of the samples (the verifier), RM reward, KL, entropy,
clip fraction, approx KL, explained variance, response length and beta; every train.eval_every
iterations the held-out greedy exact match. Writes ppo.png, exact_match.json and resumable
checkpoints.
"""

import copy
import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import config as config_lib
from research import decoding
from research import metrics as metrics_lib
from research import perf
from research import rl
from research import tokenizers
from research.checkpoint import Checkpointer
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, ScalarLM, init_decoder, init_scalar_head
from research.train import loop, pretrain, reward, sft
from research.train.optimizer import make_optimizer


@flax.struct.dataclass
class Models:
  """The policy, value and reference models and the (normalised) reward model: a pytree whose
  modules and settings are static, so jitted functions take it as one argument."""
  policy: DecoderLM = flax.struct.field(pytree_node=False)
  value: ScalarLM = flax.struct.field(pytree_node=False)
  settings: tuple = flax.struct.field(pytree_node=False)  # sorted (key, value) of config.ppo
  ref_params: Any
  reward: reward.RewardModel | None  # None with ppo.reward='checker'.

  @property
  def ppo(self) -> dict:
    return dict(self.settings)


def inputs(rollout: dict) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  return rollout['tokens'], rollout['positions'], rollout['segments']


def logprobs(models: Models, policy_params: Any, rollout: dict
             ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(log-probs, entropies) [batch, resp_len] of a rollout's response tokens under the policy
  with `policy_params` (the reference's: models.ref_params), at ppo.temperature."""
  logits, _ = models.policy.apply({'params': policy_params}, *inputs(rollout))
  resp = rollout['responses']
  return rl.token_logprobs(rl.response_window(logits, resp.shape[1]), resp,
                           models.ppo['temperature'])


def values(models: Models, value_params: Any, rollout: dict) -> jnp.ndarray:
  """The value model's estimates [batch, resp_len] before each response token."""
  out = models.value.apply({'params': value_params}, *inputs(rollout))
  return rl.response_window(out, rollout['responses'].shape[1])


@jax.jit
def sample_responses(models: Models, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
                     key: jax.Array) -> jnp.ndarray:
  """Responses [batch, max_new_tokens] of the policy to left-padded prompts [batch, prompt_len],
  sampled at ppo.temperature."""
  p = models.ppo
  return decoding.sample(models.policy, params['policy'], prompts, prompt_mask, key,
                         max_new_tokens=p['max_new_tokens'], temperature=p['temperature'],
                         top_k=0, top_p=1.0, eos_id=p['eos_id'], pad_id=p['pad_id'])


@jax.jit
def rollout_step(models: Models, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
                 responses: jnp.ndarray, beta: jnp.ndarray,
                 checker_score: jnp.ndarray | None = None) -> tuple[dict, dict]:
  """Everything an update needs from prompts [batch, prompt_len] and their sampled responses:
  (rollout arrays, metrics). The score is the reward model's, or `checker_score` [batch] when
  given (ppo.reward='checker')."""
  p = models.ppo
  tokens, positions, segments, mask = rl.join(prompts, prompt_mask, responses, p['eos_id'])
  out = {'tokens': tokens, 'positions': positions, 'segments': segments,
         'responses': responses, 'mask': mask}
  logp, entropy = logprobs(models, params['policy'], out)
  ref_logp, _ = logprobs(models, models.ref_params, out)
  old_values = values(models, params['value'], out)
  rm_score = (models.reward.score(tokens, positions, segments) if checker_score is None
              else checker_score.astype(jnp.float32))
  has_eos = jnp.any((responses == p['eos_id']) & (mask > 0), axis=1)
  score = jnp.where(has_eos, rm_score, -p['missing_eos_penalty'])
  kl = rl.kl_estimate(logp, ref_logp, p['kl_estimator']) * mask
  rewards = rl.token_rewards(score, kl, mask, beta)
  advantages, returns = rl.gae(rewards, old_values, mask, p['gamma'], p['lam'])
  out.update(logp=logp, values=old_values, advantages=rl.whiten(advantages, mask), returns=returns)
  metrics = {'rm_reward': rm_score.mean(), 'score': score.mean(), 'kl': kl.sum(1).mean(),
             'entropy': rl.masked_mean(entropy, mask), 'response_length': mask.sum(1).mean(),
             'eos_fraction': has_eos.mean(), 'non_score_reward': (-beta * kl).sum(1).mean(),
             'explained_variance': rl.explained_variance(old_values, returns, mask)}
  return out, metrics


def ppo_loss(models: Models, params: Any, batch: dict) -> tuple[jnp.ndarray, dict]:
  """Clipped policy surrogate + value_coef * clipped value loss on a minibatch of rollouts."""
  p = models.ppo
  logp, entropy = logprobs(models, params['policy'], batch)
  new_values = values(models, params['value'], batch)
  mask = batch['mask']
  pg_loss, metrics = rl.policy_loss(logp, batch['logp'], batch['advantages'], mask, p['clip'])
  vf_loss = rl.value_loss(new_values, batch['values'], batch['returns'], mask, p['value_clip'])
  return pg_loss + p['value_coef'] * vf_loss, {
      'policy_loss': pg_loss, 'value_loss': vf_loss, 'update_entropy': rl.masked_mean(
          entropy, mask), **metrics}


@functools.partial(jax.jit, static_argnames='tx', donate_argnames='state')
def update_step(models: Models, tx: optax.GradientTransformation, state: dict, batch: dict
                ) -> tuple[dict, dict]:
  (loss, metrics), grads = jax.value_and_grad(functools.partial(ppo_loss, models), has_aux=True)(
      state['params'], batch)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  return ({'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
           'beta': state['beta']}, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics})


def init_value(cfg: ModelConfig, sft_params: Any) -> Any:
  """The value model's parameters: the SFT decoder and a zero head, so values start at 0 and the
  first advantages come from the rewards alone. (A randomly initialised head gave values of std
  ~1 whose differences, whitened, drove the first updates: KL to the reference 4 nats after 3
  iterations, with the exact checker as the reward.)"""
  params = init_scalar_head(cfg, jax.random.key(0), sft_params)
  return {**params, 'head': jax.tree.map(jnp.zeros_like, params['head'])}


def step_spec(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[loop.Task, dict]:
  """(task, one minibatch of rollouts) of PPO's update for the model `cfg`, on placeholder data
  (only the shapes matter): the update step that research/compile.py compiles. Prompts fill
  train.seq_len - ppo.max_new_tokens positions."""
  t, p = config.train, config.ppo
  settings = {**p.to_dict(), 'eos_id': 0, 'pad_id': 0}
  models = Models(DecoderLM(cfg), ScalarLM(cfg), tuple(sorted(settings.items())), None, None)
  b, r = p.minibatch_size, p.max_new_tokens
  length = t.seq_len
  tokens = np.zeros((b, length), np.int32)
  floats = np.zeros((b, r), np.float32)
  batch = {'tokens': tokens, 'positions': tokens, 'segments': tokens + 1,
           'responses': tokens[:, :r], 'mask': floats + 1, 'logp': floats, 'values': floats,
           'advantages': floats, 'returns': floats}

  def init(key):
    policy = init_decoder(models.policy, key)
    return {'policy': policy, 'value': init_value(cfg, policy)}

  task = loop.Task(
      init_params=init, loss_fn=lambda params, batch, key: ppo_loss(models, params, batch),
      eval_fn=None, train_batch=lambda step, micro, rows: batch, eval_batches=[],
      tokens_per_step=b * length,
      flops_per_token=lambda params: 2 * perf.train_flops_per_token(
          params['policy'], cfg.num_layers, cfg.d_model, length))
  return task, batch


def task_prompts(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer
                 ) -> tuple[list[sft_data.Record], np.ndarray, np.ndarray]:
  """The train records whose prompts PPO answers, and those prompts left-padded to one length."""
  records, _ = sft.load_records(config)
  records = [r for r in records if r.messages and r.messages[-1]['role'] == 'assistant']
  prompts, mask = decoding.left_pad([decoding.chat_prompt(tok, r.messages[:-1]) for r in records],
                                    tok.pad_id)
  if prompts.shape[1] + config.ppo.max_new_tokens > config.model.max_len:
    raise UserError(f'prompts of {prompts.shape[1]} tokens + ppo.max_new_tokens='
                    f'{config.ppo.max_new_tokens} exceed model.max_len={config.model.max_len}; '
                    'lower ppo.max_new_tokens or use shorter prompts.')
  return records, prompts, mask


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs PPO in `workdir` (resuming from its latest checkpoint); returns the final metrics."""
  config = copy.deepcopy(config)
  if not config.train.init_from:
    config.train.init_from = reward.earlier_run(config, workdir, 'sft')
  checker = config.ppo.reward == 'checker'
  if not config.ppo.reward_from and not checker:
    if 'reward' in config.earlier:  # The reward model starts from this policy's SFT run.
      config.earlier.reward.train.init_from = config.train.init_from
    config.ppo.reward_from = reward.earlier_run(config, workdir, 'reward')
  if jax.process_index() == 0:
    config_lib.save_to_workdir(config, workdir)
  tok, sft_params = pretrain.init_from(config, workdir)
  reward_tok, reward_model = (tok, None) if checker else reward.load(config.ppo.reward_from)
  if reward_tok.vocab_size != tok.vocab_size or reward_tok.eos_id != tok.eos_id:
    raise UserError(f'ppo.reward_from={config.ppo.reward_from!r} reads another tokenizer (vocab '
                    f'{reward_tok.vocab_size}, here {tok.vocab_size}); train the reward model from '
                    'this policy\'s SFT run (train.init_from) or point to one that was.')
  cfg = config_lib.model_config(config, tok.vocab_size)
  t, p = config.train, config.ppo
  settings = {**p.to_dict(), 'eos_id': tok.eos_id, 'pad_id': tok.pad_id}
  models = Models(DecoderLM(cfg), ScalarLM(cfg), tuple(sorted(settings.items())), sft_params,
                  reward_model)
  records, prompts, prompt_mask = task_prompts(config, tok)
  _, held_out = sft.load_records(config)

  updates_per_iteration = p.epochs * (t.batch_size // p.minibatch_size)
  schedule = copy.deepcopy(config.train)  # The learning-rate schedule counts updates.
  schedule.steps = t.steps * updates_per_iteration
  tx = make_optimizer(schedule)
  # Copies: updates donate their buffers, and the reference keeps the SFT weights.
  params = jax.tree.map(jnp.array, {'policy': sft_params, 'value': init_value(cfg, sft_params)})
  state = {'params': params, 'opt_state': tx.init(params), 'beta': jnp.float32(p.beta)}
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), t.keep_checkpoints)
  start, restored = ckpt.restore_newest(lambda step: ckpt.restore(step, state),
                                        t.resume_step or None)
  start = start or 0
  if start >= t.steps:
    ckpt.close()
    print(f'{workdir} is already trained to iteration {start} (train.steps={t.steps})', flush=True)
    return {}
  if start:
    state = restored
    print(f'resumed from the checkpoint at iteration {start}', flush=True)
  writer = metrics_lib.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
  progress = metrics_lib.Progress(start, t.steps)
  results = {}
  if start == 0:
    results['before'] = sft.score(config, models.policy, sft_params, tok, held_out)
    writer.write(0, {'eval/exact_match': results['before']['all']})
    print(f'held-out exact match before PPO: {results["before"]}', flush=True)
  key = jax.random.key(config.seed)
  last = {}
  try:
    for it in range(start, t.steps):
      rng = np.random.default_rng([config.seed, it])
      idx = rng.choice(len(records), t.batch_size, replace=False)
      responses = sample_responses(models, state['params'], prompts[idx], prompt_mask[idx],
                                   jax.random.fold_in(key, it))
      right = np.array([synthetic.matches(tok.decode(r), records[i].messages[-1]['content'])
                        for r, i in zip(np.asarray(responses), idx)], np.float32)
      task_score = float(right.mean())
      rollout, metrics = rollout_step(models, state['params'], prompts[idx], prompt_mask[idx],
                                      responses, state['beta'],
                                      right if p.reward == 'checker' else None)
      update_metrics = []
      for _ in range(p.epochs):
        order = rng.permutation(t.batch_size)
        for m in range(0, t.batch_size, p.minibatch_size):
          mb = jax.tree.map(lambda x: x[order[m:m + p.minibatch_size]], rollout)
          state, um = update_step(models, tx, state, mb)
          update_metrics.append(um)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics.update({k: float(np.mean([float(u[k]) for u in update_metrics]))
                      for k in update_metrics[0]})
      beta = float(state['beta'])
      metrics.update(task_score=float(task_score), beta=beta)
      if p.target_kl > 0:
        state['beta'] = jnp.float32(rl.adaptive_beta(beta, metrics['kl'], p.target_kl, p.horizon,
                                                     t.batch_size))
      done = it + 1
      last = {f'train/{k}': v for k, v in metrics.items()}
      writer.write(done, last)
      if done % t.log_every == 0 or done == t.steps:
        print(progress.line(done, {'task': task_score, 'rm': metrics['rm_reward'],
                                   'kl': metrics['kl'], 'len': metrics['response_length']}),
              flush=True)
      if done % t.eval_every == 0 or done == t.steps:
        held = sft.score(config, models.policy, state['params']['policy'], tok, held_out)
        last['eval/exact_match'] = held['all']
        writer.write(done, {'eval/exact_match': held['all']})
        print(f'  eval at iteration {done}: held-out exact match {held}', flush=True)
        results['after'] = held
      if done % t.checkpoint_every == 0 or done == t.steps:
        ckpt.save(done, state)
  finally:
    ckpt.close()
    writer.close()
  policy = Checkpointer(os.path.join(workdir, 'policy'), 1)  # Read by pretrain.load_trained.
  policy.save(t.steps, state['params']['policy'])
  policy.close()
  if jax.process_index() == 0:
    metrics_lib.plot_panels(writer.path, os.path.join(workdir, 'ppo.png'), {
        'held-out / sampled exact match': ('eval/exact_match', 'train/task_score'),
        'normalised RM reward': ('train/rm_reward',),
        'KL to the SFT reference (nats/response)': ('train/kl',)},
        title=f'PPO ({os.path.basename(os.path.normpath(workdir))}, seed {config.seed})')
    with open(os.path.join(workdir, 'exact_match.json'), 'w') as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump({'step': t.steps, 'finished': True, **last}, f)
  return last
