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
An iteration is a step of the shared loop (research/train/loop.py): the rollout is its rollout
hook, the updates go through its train step, and the adaptive KL coefficient is task state
checkpointed with the weights, so PPO saves on SIGTERM, halts on NaN, shards over the mesh and
resumes exactly like every stage.

Starts from `train.init_from` (the SFT run; else `earlier.sft` is trained in <root>/sft) and
`ppo.reward_from` (else `earlier.reward` is trained in <root>/reward). With
ppo.reward='checker' the score is instead 1 for a reply that matches the record's answer exactly,
else 0 (a verifiable reward, as in RLVR): no reward model, and the upper bound of what a reward
model of that task can give PPO.

Logs (means over train.log_every iterations) the true task score of the samples (the verifier),
RM reward, KL, entropy, clip fraction, approx KL, explained variance, response length and beta;
every train.eval_every iterations the held-out greedy exact match. Writes ppo.png,
exact_match.json and the final policy alone in <workdir>/policy (what `runs.load_trained`
reads).
"""

import json
import os
from typing import Any

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
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, ScalarLM, init_decoder, init_scalar_head
from research.train import loop, stages


@flax.struct.dataclass
class Models:
  """The policy, value and reference models and the (normalised) reward model: a pytree whose
  modules and settings are static, so jitted functions take it as one argument."""
  policy: DecoderLM = flax.struct.field(pytree_node=False)
  value: ScalarLM = flax.struct.field(pytree_node=False)
  settings: tuple = flax.struct.field(pytree_node=False)  # sorted (key, value) of config.ppo
  ref_params: Any
  reward: rl.RewardModel | None  # None with ppo.reward='checker'.

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
      tokens_per_step=b * length, flops_per_token=lambda params: flops_per_token(config, params),
      rows_per_update=b)
  return task, batch


def flops_per_token(config: ml_collections.ConfigDict, params: Any) -> float:
  """Training FLOPs per token of an update: the policy's and the value model's."""
  return 2 * perf.model_flops_per_token(config.model, params['policy'], config.train.seq_len)


def task_prompts(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer
                 ) -> tuple[list[sft_data.Record], np.ndarray, np.ndarray]:
  """The train records whose prompts PPO answers, and those prompts left-padded to one length."""
  records, _ = sft_data.load_records(config)
  records = [r for r in records if r.messages and r.messages[-1]['role'] == 'assistant']
  prompts, mask = decoding.left_pad([decoding.chat_prompt(tok, r.messages[:-1]) for r in records],
                                    tok.pad_id)
  if prompts.shape[1] + config.ppo.max_new_tokens > config.model.max_len:
    raise UserError(f'prompts of {prompts.shape[1]} tokens + ppo.max_new_tokens='
                    f'{config.ppo.max_new_tokens} exceed model.max_len={config.model.max_len}; '
                    'lower ppo.max_new_tokens or use shorter prompts.')
  return records, prompts, mask




class Rollouts:
  """PPO's rollout hook (`loop.Task.rollout`) and the minibatches of its updates
  (`loop.Task.train_batch`): train.batch_size prompts drawn by (seed, step), answered and scored
  with the current weights, then ppo.epochs shuffled passes of ppo.minibatch_size rollouts."""

  def __init__(self, config: ml_collections.ConfigDict, models: Models,
               reward: rl.RewardModel | None, tok: tokenizers.Tokenizer):
    self.config, self.models, self.reward, self.tok = config, models, reward, tok
    self.records, self.prompts, self.prompt_mask = task_prompts(config, tok)
    self.buffer, self.orders = {}, []

  def __call__(self, params: Any, frozen: Any, extra: dict, step: int) -> tuple[dict, dict]:
    t, p = self.config.train, self.config.ppo
    rng = np.random.default_rng([self.config.seed, step])
    idx = rng.choice(len(self.records), t.batch_size, replace=False)
    reward = None if self.reward is None else self.reward.replace(params=frozen['reward'])
    models = self.models.replace(ref_params=frozen['ref'], reward=reward)
    prompts, mask = self.prompts[idx], self.prompt_mask[idx]
    responses = sample_responses(models, params, prompts, mask,
                                 jax.random.fold_in(jax.random.key(self.config.seed), step))
    right = np.array([synthetic.matches(self.tok.decode(r), self.records[i].messages[-1]['content'])
                      for r, i in zip(parallel.to_host(responses), idx)], np.float32)
    beta = float(parallel.to_host(extra['beta']))
    rollout, metrics = rollout_step(models, params, prompts, mask, responses, extra['beta'],
                                    right if p.reward == 'checker' else None)
    self.buffer = parallel.to_host(rollout)
    self.orders = [rng.permutation(t.batch_size) for _ in range(p.epochs)]
    metrics = {k: float(v) for k, v in parallel.to_host(metrics).items()}
    metrics.update(task_score=float(right.mean()), beta=beta)
    if p.target_kl > 0:
      beta = rl.adaptive_beta(beta, metrics['kl'], p.target_kl, p.horizon, t.batch_size)
    return {'beta': np.float32(beta)}, metrics

  def batch(self, step: int, update: int, rows: slice) -> dict[str, np.ndarray]:
    """This process's rows of minibatch `update` of the step's rollouts."""
    del step  # The buffer holds the current step's rollouts.
    size = self.config.ppo.minibatch_size
    epoch, m = divmod(update, self.config.train.batch_size // size)
    ids = self.orders[epoch][m * size:(m + 1) * size]
    return {k: v[ids][rows] for k, v in self.buffer.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Runs PPO in `workdir` (resuming from its latest checkpoint); exports the final policy to
  <workdir>/policy and writes exact_match.json and ppo.png."""
  tok, sft_params = runs.init_from(config, workdir)
  checker = config.ppo.reward == 'checker'
  reward_tok, reward = (tok, None) if checker else runs.load_reward(config.ppo.reward_from)
  if reward_tok.vocab_size != tok.vocab_size or reward_tok.eos_id != tok.eos_id:
    raise UserError(f'ppo.reward_from={config.ppo.reward_from!r} reads another tokenizer (vocab '
                    f'{reward_tok.vocab_size}, here {tok.vocab_size}); train the reward model from '
                    'this policy\'s SFT run (train.init_from) or point to one that was.')
  cfg = config_lib.model_config(config, tok.vocab_size)
  t, p = config.train, config.ppo
  settings = {**p.to_dict(), 'eos_id': tok.eos_id, 'pad_id': tok.pad_id}
  models = Models(DecoderLM(cfg), ScalarLM(cfg), tuple(sorted(settings.items())), None, None)
  rollouts = Rollouts(config, models, reward, tok)
  _, held_out = sft_data.load_records(config)
  results = {'before': sft_data.score(config, models.policy, sft_params, tok, held_out)}
  print(f'held-out exact match before PPO: {results["before"]}', flush=True)

  def evaluate(params):
    results['after'] = sft_data.score(config, models.policy, params['policy'], tok, held_out)
    return {'exact_match': results['after']['all']}

  def init(key):
    policy = init_decoder(models.policy, key)
    return {'policy': policy, 'value': init_value(cfg, policy)}

  # Copies: the updates donate their buffers, and the reference keeps the SFT weights.
  start = jax.tree.map(jnp.copy, {'policy': sft_params, 'value': init_value(cfg, sft_params)})
  task = loop.Task(
      init_params=init, start_params=start,
      loss_fn=lambda params, batch, key, frozen: ppo_loss(models, params, batch),
      eval_fn=None, eval_batches=[], evaluate=evaluate,
      train_batch=rollouts.batch, rollout=rollouts,
      frozen={'ref': sft_params, 'reward': None if reward is None else reward.params},
      init_extra={'beta': np.float32(p.beta)},
      updates_per_step=p.epochs * (t.batch_size // p.minibatch_size),
      rows_per_update=p.minibatch_size,
      tokens_per_step=p.epochs * t.batch_size * (rollouts.prompts.shape[1] + p.max_new_tokens),
      flops_per_token=lambda params: flops_per_token(config, params))
  result = loop.run(config, workdir, task)
  runs.export_weights(workdir, STAGE.weights, t.steps, result.params['policy'])
  if jax.process_index() == 0:
    metrics_lib.plot_panels(os.path.join(workdir, 'metrics.jsonl'),
                            os.path.join(workdir, 'ppo.png'), {
        'held-out / sampled exact match': ('eval/exact_match', 'train/task_score'),
        'normalised RM reward': ('train/rm_reward',),
        'KL to the SFT reference (nats/response)': ('train/kl',)},
        title=f'PPO ({os.path.basename(os.path.normpath(workdir))}, seed {config.seed})')
    with open(os.path.join(workdir, 'exact_match.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return result


def sections() -> dict[str, ml_collections.ConfigDict]:
  # train.steps counts rollout iterations, train.batch_size is the number of prompts per rollout.
  return {'ppo': ml_collections.ConfigDict(dict(
      reward='model',  # model | checker (1 if the reply is the record's answer, else 0).
      reward_from='',  # The reward model's workdir; '' = train earlier.reward in <root>/reward.
      temperature=1.0,  # Rollout sampling temperature (log-probs use the same one).
      max_new_tokens=16,
      missing_eos_penalty=3.0,  # A response without EOS scores minus this (not its RM score).
      kl_estimator='k1',  # One of rl.KL_ESTIMATORS.
      beta=0.05,  # KL coefficient; adaptive (Ziegler et al. 2019) when target_kl > 0.
      target_kl=0.0,
      horizon=10000,
      gamma=1.0,
      lam=0.95,
      epochs=4,  # Passes over each rollout batch,
      minibatch_size=16,  # in shuffled minibatches of this many rollouts.
      clip=0.2,  # Policy ratio clip,
      value_clip=0.2,  # and value clip, around the rollout's values.
      value_coef=0.1,
  ))}


REWARDS = ('model', 'checker')


def check(config: ml_collections.ConfigDict) -> None:
  p, t = config.ppo, config.train
  if p.reward not in REWARDS:
    raise UserError(f'ppo.reward={p.reward!r} is not one of {REWARDS}.')
  if p.kl_estimator not in rl.KL_ESTIMATORS:
    raise UserError(f'ppo.kl_estimator={p.kl_estimator!r} is not one of {rl.KL_ESTIMATORS}.')
  if p.minibatch_size <= 0 or t.batch_size % p.minibatch_size:
    raise UserError(f'train.batch_size={t.batch_size} (rollouts per iteration) must be a multiple '
                    f'of ppo.minibatch_size={p.minibatch_size}.')
  if t.grad_accum_steps != 1:
    raise UserError(f"train.grad_accum_steps={t.grad_accum_steps} does not apply to stage='ppo' "
                    '(it updates once per ppo.minibatch_size rollouts, ppo.epochs times a batch); '
                    'set --config.train.grad_accum_steps=1 and size updates by ppo.minibatch_size.')


STAGE = stages.Stage(
    name='ppo', train=train, sections=sections, check=check, step_spec=step_spec,
    needs=(stages.Need('sft'),
           stages.Need('reward', 'ppo.reward_from', lambda c: c.ppo.reward != 'checker')),
    weights='policy', reads=('sft', 'pairs'))
