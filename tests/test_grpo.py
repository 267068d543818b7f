"""The GRPO stage: the sampler's log-probs are the trainer's, rewards fail in one line, dynamic
sampling refills the batch, and a SIGTERM mid-run resumes bit-exactly (on the shared loop)."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import decoding
from research import rl
from research import runs
from research.data import sft as sft_data
from research.errors import UserError
from research.train import grpo, loop, stages
from tests.test_ppo_loop import flat


def grpo_config(sft_dir: str, **grpo_keys) -> config_lib.ml_collections.ConfigDict:
  c = runs.read_config(sft_dir)
  c.stage, c.earlier = 'grpo', {}
  c.train.update(steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=1, log_every=1,
                 eval_every=2, checkpoint_every=2, init_from=sft_dir)
  c.grpo.update(dict(dict(group_size=4, minibatch_size=8, max_new_tokens=4, bucket_prompts=2),
                     **grpo_keys))
  config_lib.validate(c)
  return c


def parity_reward(prompt: str, completion: str, record: dict) -> float:
  """Varies between replies only for prompts with an even digit count: other groups are all 0."""
  return float(len(completion) % 2) if sum(ch.isdigit() for ch in prompt) % 2 == 0 else 0.0


def broken_reward(prompt: str, completion: str, record: dict) -> float:
  return 'high'


def test_sampler_logprobs_are_the_trainers(sft_run):
  """Replies sampled with a shared prefill and their log-probs from the decode loop equal the
  log-probs a full forward pass of the joined sequences gives (float32, within 1e-5)."""
  _, tok, model, params = runs.load_trained(sft_run)
  records, _ = sft_data.load_records(runs.read_config(sft_run))
  prompts, mask = decoding.left_pad(
      [decoding.chat_prompt(tok, r.messages[:-1]) for r in records[:3]], tok.pad_id)
  replies, logp = decoding.sample_groups(model, params, prompts, mask, jax.random.key(0), group=4,
                                         max_new_tokens=6, temperature=1.0, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id)
  assert replies.shape == (12, 6) and len({tuple(r) for r in np.asarray(replies)}) > 3
  rows = np.repeat(np.arange(3), 4)
  tokens, positions, segments, resp_mask = rl.join(prompts[rows], mask[rows], replies, tok.eos_id)
  policy = grpo.Policy(model, (('temperature', 1.0),))
  again = grpo.logprobs(policy, params, {'tokens': tokens, 'positions': positions,
                                         'segments': segments, 'responses': replies})
  np.testing.assert_allclose(np.asarray(logp) * resp_mask, np.asarray(again) * resp_mask,
                             atol=1e-5)
  assert float(jnp.abs(logp * resp_mask).sum()) > 0


def test_a_reward_that_fails_is_one_line_naming_the_prompt(sft_run, tmp_path):
  config = grpo_config(sft_run, rewards=('tests.test_grpo:broken_reward',))
  with pytest.raises(UserError, match=r"reward 'tests.test_grpo:broken_reward' failed on the "
                                      r"prompt '.*' \(reply .*\): ValueError.*finite number"):
    stages.train(config, str(tmp_path))
  with pytest.raises(UserError, match='does not import'):
    grpo.user_function('tests.test_grpo:no_such_function')


def test_dynamic_sampling_refills_the_batch(sft_run, tmp_path, monkeypatch):
  """Groups whose rewards are all equal are dropped and more prompts sampled until the batch
  holds train.batch_size informative groups."""
  config = grpo_config(sft_run, rewards=('tests.test_grpo:parity_reward',), loss='dapo',
                       dynamic_sampling=True, max_refills=8)
  config.train.steps = 1
  seen = []
  rollout = grpo.Rollouts.__call__

  def record(self, *args):
    out = rollout(self, *args)
    seen.append((out[1], {k: v.copy() for k, v in self.buffer.items()}))
    return out

  monkeypatch.setattr(grpo.Rollouts, '__call__', record)
  stages.train(config, str(tmp_path))
  metrics, buffer = seen[0]
  assert metrics['refills'] >= 1 and metrics['groups_informative'] == 1.0
  assert len(buffer['mask']) == 4 * 4  # batch_size groups of group_size replies.
  adv = buffer['advantages'].reshape(4, 4)
  assert (np.abs(adv).sum(axis=1) > 0).all()


def test_grpo_resumes_bit_exactly_after_sigterm(sft_run, tmp_path, monkeypatch):
  whole = str(tmp_path / 'whole')
  expected = stages.train(grpo_config(sft_run, beta=0.05), whole)
  rollout = grpo.Rollouts.__call__

  def signal_at_step_1(self, params, frozen, extra, step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return rollout(self, params, frozen, extra, step)

  stopped = str(tmp_path / 'stopped')
  monkeypatch.setattr(grpo.Rollouts, '__call__', signal_at_step_1)
  with pytest.raises(loop.Interrupted, match='SIGTERM after step 2'):
    stages.train(grpo_config(sft_run, beta=0.05), stopped)
  monkeypatch.setattr(grpo.Rollouts, '__call__', rollout)
  resumed = stages.train(grpo_config(sft_run, beta=0.05), stopped)
  np.testing.assert_array_equal(flat(resumed.params), flat(expected.params))
  assert os.path.exists(os.path.join(stopped, 'results.md'))
