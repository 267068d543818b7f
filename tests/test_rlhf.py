"""RLHF: GAE, the PPO losses, KL and rewards, the reward model's score, DPO, preference data."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import decoding
from research import rl
from research import sweep
from research import tokenizers
from research.config import default_config
from research.data import preferences
from research.data import synthetic
from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, ScalarLM, init_scalar_head
from research.train import dpo, ppo, reward

CFG = ModelConfig(vocab_size=80, num_layers=1, num_heads=2, d_model=16, max_len=64)


@pytest.fixture(scope='module')
def tok():
  return tokenizers.train_tokenizer(default_config().tokenizer,
                                    ['What is 0123456789 plus minus? abcdefghijklmnopqrstuvwxyz.'])


@pytest.fixture(scope='module')
def lm_params():
  return DecoderLM(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']


def gae_reference(rewards, values, lengths, gamma, lam):
  """A plain loop over each row's valid steps, written from the definition."""
  adv = np.zeros_like(rewards)
  for b, n in enumerate(lengths):
    for t in range(n):
      total, discount = 0.0, 1.0
      for k in range(t, n):
        next_value = values[b, k + 1] if k + 1 < n else 0.0
        delta = rewards[b, k] + gamma * next_value - values[b, k]
        total += discount * delta
        discount *= gamma * lam
      adv[b, t] = total
  return adv


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_a_plain_loop(gamma, lam):
  rng = np.random.default_rng(0)
  lengths = [5, 1, 3]
  rewards = rng.normal(size=(3, 5)).astype(np.float32)
  values = rng.normal(size=(3, 5)).astype(np.float32)
  mask = (np.arange(5) < np.array(lengths)[:, None]).astype(np.float32)
  adv, returns = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  expected = gae_reference(rewards, values, lengths, gamma, lam)
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, (expected + values) * mask, rtol=1e-5, atol=1e-5)


def test_clipped_surrogate_matches_a_hand_computed_case():
  # Token 1: ratio e^0.5 = 1.65 with A = +1 -> clipped at 1.2: loss -1.2.
  # Token 2: ratio e^-0.5 = 0.61 with A = -2 -> clipped at 0.8 (more pessimistic): loss 1.6.
  # Token 3: ratio 1 with A = 3: loss -3. Token 4 is masked out.
  logp = jnp.array([[0.5, -0.5, 0.0, 9.0]])
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, -2.0, 3.0, 100.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  loss, metrics = rl.policy_loss(logp, old, adv, mask, clip=0.2)
  np.testing.assert_allclose(loss, (-1.2 + 1.6 - 3.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['clip_frac'], 2 / 3, rtol=1e-6)
  # Value loss: new 2 vs old 0 clipped to 0.2; return 1: max((2-1)^2, (0.2-1)^2) / 2 = 0.5.
  v = rl.value_loss(jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[1.0]]), jnp.ones((1, 1)),
                    clip=0.2)
  np.testing.assert_allclose(v, 0.5, rtol=1e-6)


def test_kl_is_zero_and_rewards_are_the_score_when_policy_is_the_reference():
  logp = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  for kind in ('k1', 'k3'):
    kl = rl.kl_estimate(logp, logp, kind)
    assert (kl == 0).all()
    rewards = rl.token_rewards(jnp.array([2.5]), kl, mask, beta=jnp.float32(0.1))
    assert rewards.tolist() == [[0.0, 0.0, 2.5, 0.0]]
  # k3 never goes below 0; k1 does.
  other = logp + jnp.array([[0.3, -0.3, 1.0, 0.0]])
  assert (rl.kl_estimate(logp, other, 'k3') >= 0).all()
  assert (rl.kl_estimate(logp, other, 'k1') < 0).any()


def test_rewards_stay_float_even_from_integer_scores():
  rewards = rl.token_rewards(jnp.array([1, 0]), jnp.zeros((2, 3)), jnp.ones((2, 3)),
                             beta=jnp.float32(0.05))
  assert rewards.dtype == jnp.float32
  adv, returns = rl.gae(rewards, jnp.zeros((2, 3)), jnp.ones((2, 3)), 1.0, 0.95)
  assert adv.dtype == returns.dtype == jnp.float32


def test_response_mask_keeps_eos_and_the_value_at_eos_is_trained(tok):
  assert tok.eos_id != tok.pad_id
  e, p = tok.eos_id, tok.pad_id
  responses = jnp.array([[5, e, p, p], [5, 6, 7, 8], [e, p, p, p]])
  mask = rl.response_mask(responses, e)
  assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
  assert rl.last_index(mask).tolist() == [1, 3, 0]
  # The value predicted where EOS is the next token gets a gradient; those after it do not.
  grad = jax.grad(lambda v: rl.value_loss(v, jnp.zeros((3, 4)), jnp.ones((3, 4)), mask, 10.0))(
      jnp.zeros((3, 4)))
  assert grad[0, 1] != 0 and grad[2, 0] != 0
  assert grad[0, 2] == 0 and grad[2, 1] == 0


def test_whiten_and_explained_variance():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  w = rl.whiten(x, mask)
  np.testing.assert_allclose(rl.masked_mean(w, mask), 0.0, atol=1e-6)
  np.testing.assert_allclose(rl.masked_mean(w ** 2, mask), 1.0, rtol=1e-5)
  np.testing.assert_allclose(rl.explained_variance(x, x, mask), 1.0)


def test_adaptive_beta_follows_ziegler():
  # KL twice the target: error clipped to +0.2, scaled by batch / horizon.
  assert rl.adaptive_beta(0.1, 2.0, 1.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert rl.adaptive_beta(0.1, 0.9, 1.0, 100, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_dpo_loss_is_log2_at_init_and_its_gradient_raises_chosen(tok, lm_params):
  pairs = preferences.task_pairs(synthetic.problems('train', 6, 0), 0)
  rows, kept = preferences.encode_pairs(tok, pairs, 48)
  assert len(kept) == 6
  model = DecoderLM(CFG)
  logp = dpo.completion_logprobs(model, lm_params, rows)
  loss, metrics = rl.dpo_loss(logp, logp, beta=0.1)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert metrics['margin'] == 0
  grad = jax.grad(lambda lp: rl.dpo_loss(lp, logp, 0.1)[0])(logp)
  assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()
  # The summed completion log-prob equals a per-pair sum written out directly.
  i = 2
  tokens = rows['tokens'][i, 0, :rows['length'][i, 0]]
  logits, _ = model.apply({'params': lm_params}, jnp.asarray(tokens[None, :-1]))
  lp = jax.nn.log_softmax(logits[0])[np.arange(len(tokens) - 1), tokens[1:]]
  weights = rows['completion'][i, 0, 1:len(tokens)]
  np.testing.assert_allclose(logp[i, 0], (lp * weights).sum(), rtol=1e-5)


def test_dpo_nll_term_is_the_chosen_per_token_nll():
  logp = jnp.array([[-2.0, -1.0], [-6.0, -3.0]])
  tokens = jnp.array([2.0, 3.0])
  plain, _ = rl.dpo_loss(logp, logp, 0.1)
  loss, metrics = rl.dpo_loss(logp, logp, 0.1, tokens, nll_coef=0.5)
  assert float(metrics['chosen_nll']) == pytest.approx((2 / 2 + 6 / 3) / 2)
  assert float(loss) == pytest.approx(float(plain) + 0.5 * 1.5)
  # The NLL term pushes the chosen log-probs up and leaves the rejected ones alone.
  grad = jax.grad(lambda lp: rl.dpo_loss(lp, logp, 0.1, tokens, 1.0)[0] - rl.dpo_loss(
      lp, logp, 0.1)[0])(logp)
  assert (grad[:, 0] < 0).all() and (grad[:, 1] == 0).all()


def test_reward_is_read_at_the_last_token_whatever_the_padding(tok, lm_params):
  model = ScalarLM(CFG)
  params = init_scalar_head(CFG, jax.random.key(1), lm_params)
  pairs = preferences.task_pairs(synthetic.problems('train', 4, 0), 0)
  rows, _ = preferences.encode_pairs(tok, pairs, 52)
  wider, _ = preferences.encode_pairs(tok, pairs, 64)
  scores = reward.pair_scores(model, params, rows)
  np.testing.assert_allclose(scores, reward.pair_scores(model, params, wider), rtol=1e-5,
                             atol=1e-6)
  n = rows['length'][0, 1]
  alone = model.apply({'params': params}, jnp.asarray(rows['tokens'][None, 0, 1, :n]))
  np.testing.assert_allclose(scores[0, 1], alone[0, -1], rtol=1e-5)
  loss, metrics = reward.pair_metrics(jnp.array([[1.0, 0.0], [0.0, 2.0]]))
  np.testing.assert_allclose(loss, (-jax.nn.log_sigmoid(1.0) - jax.nn.log_sigmoid(-2.0)) / 2)
  assert metrics['accuracy'] == 0.5


def test_rollout_of_the_reference_policy_has_zero_kl(tok, lm_params):
  cfg = default_config()
  settings = {**cfg.ppo.to_dict(), 'max_new_tokens': 6, 'eos_id': tok.eos_id,
              'pad_id': tok.pad_id}
  rm = rl.RewardModel(ScalarLM(CFG), init_scalar_head(CFG, jax.random.key(2), lm_params),
                          1.0, 0.0)
  models = ppo.Models(DecoderLM(CFG), ScalarLM(CFG), tuple(sorted(settings.items())), lm_params,
                      rm)
  params = {'policy': lm_params, 'value': init_scalar_head(CFG, jax.random.key(3), lm_params)}
  prompts = [tok.apply_chat_template([{'role': 'user', 'content': q}], add_generation_prompt=True)
             for q in ('What is 1 plus 2?', 'Sort 3 1.')]
  tokens, mask = decoding.left_pad(prompts, tok.pad_id)
  responses = ppo.sample_responses(models, params, tokens, mask, jax.random.key(0))
  out, metrics = ppo.rollout_step(models, params, tokens, mask, responses, jnp.float32(0.05))
  assert float(metrics['kl']) == 0.0 and float(metrics['non_score_reward']) == 0.0
  for k in ('logp', 'values', 'advantages', 'returns'):
    assert out[k].dtype == jnp.float32
  assert out['mask'].shape == (2, 6) and (out['mask'][:, 0] == 1).all()
  loss, m = ppo.ppo_loss(models, params, out)
  assert np.isfinite(float(loss)) and float(m['approx_kl']) == pytest.approx(0.0, abs=1e-6)
  # The PPO value model starts at 0 everywhere.
  zero = ppo.values(models, ppo.init_value(CFG, lm_params), out)
  assert float(jnp.abs(zero).max()) == 0.0
  # A checker's scores replace the reward model's: with KL 0 the returns hold exactly them; a
  # response without EOS scores -missing_eos_penalty whatever its score.
  ended = np.array([tok.encode('12') + [tok.eos_id] + [tok.pad_id] * 3, tok.encode('123456')],
                   np.int32)
  checked, metrics = ppo.rollout_step(models, params, tokens, mask, ended, jnp.float32(0.05),
                                      np.array([1.0, 1.0], np.float32))
  np.testing.assert_allclose(metrics['rm_reward'], 1.0)
  np.testing.assert_allclose(checked['returns'][np.arange(2), [2, 5]],
                             [1.0, -cfg.ppo.missing_eos_penalty], atol=1e-6)


def test_preference_lines_are_checked(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text(json.dumps({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}) + '\n' +
                  json.dumps({'prompt': 'a', 'chosen': 'b'}) + '\n')
  with pytest.raises(UserError, match=r'pairs.jsonl:2: expected "prompt", "chosen"'):
    preferences.read_jsonl(str(path))
  path.write_text('{"prompt": \n')
  with pytest.raises(UserError, match=r'pairs.jsonl:1 is not valid JSON'):
    preferences.read_jsonl(str(path))
  conv = {'chosen': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}],
          'rejected': [{'role': 'user', 'content': 'other'},
                       {'role': 'assistant', 'content': 'b'}]}
  path.write_text(json.dumps(conv) + '\n')
  with pytest.raises(UserError, match='must share every message but the last'):
    preferences.read_jsonl(str(path))
  conv['rejected'][0]['content'] = 'q'
  path.write_text(json.dumps(conv) + '\n')
  [pair] = preferences.read_jsonl(str(path))
  assert (pair.prompt, pair.chosen, pair.rejected) == ([{'role': 'user', 'content': 'q'}], 'a',
                                                        'b')


def test_multi_turn_pairs_weight_only_the_final_answer(tok, tmp_path):
  """An assistant turn inside the shared prompt is context, not part of the completion (DPO's
  log-probs, its NLL term and token count): only the final answer and its EOS are weighted."""
  turns = [{'role': 'user', 'content': 'What is 1 plus 2?'},
           {'role': 'assistant', 'content': '3'},
           {'role': 'user', 'content': 'What is 1 plus 3?'}]
  path = tmp_path / 'pairs.jsonl'
  path.write_text(json.dumps({'chosen': turns + [{'role': 'assistant', 'content': '4'}],
                              'rejected': turns + [{'role': 'assistant', 'content': '5'}]}) +
                  '\n' + json.dumps({'prompt': 'What is 2 plus 2?', 'chosen': '4',
                                     'rejected': '5'}) + '\n')
  rows, _ = preferences.encode_pairs(tok, preferences.read_jsonl(str(path)), 48)
  for i in range(2):  # The multi-turn pair, and a single-turn one alike.
    for j, answer in enumerate(('4', '5')):
      n = rows['length'][i, j]
      expected = np.zeros(48, np.float32)
      expected[n - len(tok.encode(answer)) - 1:n] = 1.0  # The answer's tokens and EOS.
      np.testing.assert_array_equal(rows['completion'][i, j], expected)


def test_built_in_pairs_are_right_against_wrong():
  problems = synthetic.problems('train', 200, 0)
  pairs = preferences.task_pairs(problems, 0)
  for p, pair in zip(problems, pairs):
    assert synthetic.is_correct(pair.chosen, p)
    assert not synthetic.is_correct(pair.rejected, p)
  near = [preferences.nearly_right(p, np.random.default_rng(0)) for p in problems]
  assert all(n != p.answer for n, p in zip(near, problems))


def test_nearly_right_sorted_lists_are_mostly_sorted_with_one_digit_changed():
  """The SFT policy's sorting mistakes are mostly a sorted list with one digit off by one or
  copied from its neighbour; the built-in hard negatives must include both, not only unsorted
  lists."""
  problems = synthetic.problems('train', 400, 0, kinds=('sort',))
  rng = np.random.default_rng(0)
  near = [preferences.nearly_right(p, rng).split() for p in problems]
  answers = [p.answer.split() for p in problems]
  assert all(n != a for n, a in zip(near, answers))
  one_changed = [(n, a) for n, a in zip(near, answers)
                 if n == sorted(n) and len(n) == len(a) and sum(x != y for x, y in zip(n, a)) == 1]
  copies = [n for n, a in one_changed if len(set(n)) < len(set(a))]
  off_by_one = [n for n, a in one_changed if sorted(map(int, n)) != sorted(map(int, a))
                and sum(abs(int(x) - int(y)) for x, y in zip(n, a)) == 1]
  unsorted = [n for n in near if n != sorted(n)]
  assert 0.25 < len(copies) / len(near) < 0.55 and 0.2 < len(off_by_one) / len(near) < 0.55
  assert 0.1 < len(unsorted) / len(near) < 0.35


def test_task_kinds_are_chosen_and_checked():
  assert {p.kind for p in synthetic.problems('held_out', 20, 0, kinds=('sort', 'count'))} == {
      'sort', 'count'}
  with pytest.raises(UserError, match=r"\['sorting'\] not among the built-in kinds"):
    synthetic.problems('train', 5, 0, kinds=('sorting',))


def test_policy_pair_accuracy_matches_a_hand_count():
  scores = np.array([[3.0, 0.0, 5.0], [1.0, 2.0, 5.0], [1.0, 1.0, 5.0]])  # [samples, prompts]
  correct = np.array([[True, True, True], [False, False, True], [True, False, True]])
  # Prompt 0: right {3, 1} vs wrong {1}: 1 + 0.5 (a tie). Prompt 1: right {0} vs wrong {2, 1}: 0.
  # Prompt 2: no wrong reply. The right 3 of prompt 0 against prompt 1's wrong 2 does not count.
  assert reward.policy_pair_accuracy(scores, correct) == pytest.approx(1.5 / 4)
  assert math.isnan(reward.policy_pair_accuracy(scores, np.ones((3, 3), bool)))


def test_policy_pairs_are_the_wrong_replies_against_the_answer(monkeypatch):
  config = default_config()
  config.sft.kinds = ('sort',)
  config.reward.policy_pairs = 4
  problems = synthetic.problems('train', 4, config.seed + 2, ('sort',))
  replies = [problems[0].answer, ' ' + problems[1].answer + ' ', '9 9', '']  # Two right.
  monkeypatch.setattr(reward, 'policy_samples', lambda *args, **kwargs: (replies, None))
  pairs = reward.policy_pairs(config, None, None, None)
  assert [(p.prompt[0]['content'], p.chosen, p.rejected) for p in pairs] == [
      (problems[2].prompt, problems[2].answer, '9 9'), (problems[3].prompt, problems[3].answer, '')]
  config.reward.path = 'pairs.jsonl'
  config.stage = 'reward'  # The reward stage's own check.
  with pytest.raises(UserError, match='reward.policy_pairs=4 needs the built-in pairs'):
    config_lib.validate(config)


def test_ppo_refuses_gradient_accumulation():
  """PPO calls the optimizer once per minibatch: optax.MultiSteps would apply 1 in k updates."""
  config = default_config()
  config.stage = 'ppo'
  config.train.grad_accum_steps = 2
  with pytest.raises(UserError, match=r"grad_accum_steps=2 does not apply to stage='ppo'.*"
                     r'set --config.train.grad_accum_steps=1'):
    config_lib.validate(config)
  for stage in ('sft', 'reward', 'dpo'):  # They accumulate in the shared loop.
    config.stage = stage
    config_lib.validate(config)


def test_jsonl_sft_and_reward_data_must_hold_out_the_same_share(tmp_path):
  """Both split by the same prompt hash: with other fractions, the prompts between them are
  trained on by one stage and held out by another."""
  sft_file, pairs_file = tmp_path / 'sft.jsonl', tmp_path / 'pairs.jsonl'
  sft_file.write_text('{"prompt": "2+3?", "completion": "5"}\n')
  pairs_file.write_text('{"prompt": "2+3?", "chosen": "5", "rejected": "6"}\n')
  config = default_config()
  config.sft.update(path=str(sft_file), held_out_fraction=0.05)
  config.reward.update(path=str(pairs_file), held_out_fraction=0.2)
  for stage in ('reward', 'dpo', 'ppo'):
    config.stage = stage
    with pytest.raises(UserError, match=r'sft.held_out_fraction=0.05 and '
                       r'reward.held_out_fraction=0.2 differ.*set them equal'):
      config_lib.validate(config)
  config.stage = 'sft'  # Reads no pairs.
  config_lib.validate(config)
  config.stage = 'dpo'
  config.sft.path = ''  # The built-in task's split uses neither fraction.
  config_lib.validate(config)
  config.sft.update(path=str(sft_file), held_out_fraction=0.2)
  config_lib.validate(config)


@pytest.mark.slow
def test_rlhf_pipeline_runs_end_to_end_through_launch(tmp_path):
  """rlhf_small with every stage shrunk to a few steps: all stages run, the table is written,
  a rerun skips the finished stages, and the PPO policy loads for generation."""
  shrink = ['--config.sft.num_held_out=64', '--config.sft.pretrain.steps=10',  # Every stage's.
            '--config.reward.normalise_samples=64',
            '--config.earlier.reward.reward.policy_pairs=256']
  for stage, steps in (('sft', 20), ('reward', 10), ('ppo', 3), ('dpo', 10)):
    shrink += [f'--config.earlier.{stage}.train.steps={steps}',  # One stage's.
               f'--config.earlier.{stage}.train.eval_every={steps}']
  cmd = [sys.executable, sweep.LAUNCH, '--experiment=rlhf_small', f'--workdir={tmp_path}'] + shrink
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = json.load(open(tmp_path / 'results.json'))
  assert list(rows) == ['pretrain', 'sft', 'ppo', 'dpo']
  assert rows['sft']['kl_to_sft'] == 0.0 and rows['ppo']['kl_to_sft'] != 0.0
  assert (tmp_path / 'rlhf.png').stat().st_size > 0
  assert (tmp_path / 'ppo' / 'ppo.png').stat().st_size > 0
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert again.returncode == 0 and again.stdout.count(': done in ') == 4, again.stdout[-2000:]
  gen = subprocess.run([sys.executable, sweep.LAUNCH, '--experiment=ppo_small', '--mode=generate',
                        f'--workdir={tmp_path / "ppo"}', '--prompt=What is 1 plus 2?'],
                       capture_output=True, text=True, timeout=600, check=False)
  assert gen.returncode == 0, gen.stderr[-2000:]
  scorer = subprocess.run([sys.executable, sweep.LAUNCH, '--experiment=reward_small',
                           '--mode=generate', f'--workdir={tmp_path / "reward"}', '--prompt=1'],
                          capture_output=True, text=True, timeout=600, check=False)
  assert scorer.returncode != 0 and 'holds a reward model' in scorer.stderr, scorer.stderr[-500:]


def test_pairs_from_a_file_are_split_by_prompt(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text(''.join(json.dumps({'prompt': f'q{i}', 'chosen': 'a', 'rejected': 'b'}) + '\n'
                          for i in range(200)))
  config = default_config()
  config.reward.update(path=str(path), held_out_fraction=0.2)
  train, held_out = preferences.load_pairs(config)
  assert len(train) + len(held_out) == 200 and 20 < len(held_out) < 60
  assert not {p.prompt[0]['content'] for p in train} & {p.prompt[0]['content'] for p in held_out}
  config.reward.held_out_fraction = 0.0
  with pytest.raises(UserError, match='0 held-out'):
    preferences.load_pairs(config)
