"""Mixture-of-Experts: gating, a slow reference, balancing losses, capacity, padding, training.

Params and inputs are drawn with numpy from the shapes `jax.eval_shape` gives, so that only the
programs under test are compiled (each compile costs seconds on 2 cores).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import perf
from research.errors import UserError
from research.nn import moe
from research.nn.config import ModelConfig
from research.nn.ffn import FeedForward
from research.nn.transformer import DecoderLM
from research.train import pretrain
from research.train import lm
from tests.conftest import tiny_config

G, S, D, E = 2, 8, 8, 4
CFG = ModelConfig(vocab_size=1, num_heads=2, d_model=D, ffn_multiplier=2.0, ffn='swiglu',
                  num_experts=E, moe_capacity_factor=0.0)


def random_params(init_fn, *args, scale: float) -> dict:
  """Params of the shapes `init_fn(key, *args)` makes, all N(0, scale^2) (router included)."""
  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def inputs(seq: int = S, seed: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x [G, seq, D] and an all-ones token mask [G, seq]."""
  x = np.random.default_rng(100 + seed).normal(size=(G, seq, D)).astype(np.float32)
  return jnp.asarray(x), jnp.ones((G, seq), bool)


def numpy_top_k_gates(logits: np.ndarray, k: int) -> np.ndarray:
  """Softmax over the top k logits (Shazeer et al.); at k = 1 the softmax over all logits at the
  argmax (Switch)."""
  top = np.argsort(-logits, axis=-1)[..., :k]
  top_logits = np.take_along_axis(logits, top, -1)
  pool = logits if k == 1 else top_logits
  weights = np.exp(top_logits - pool.max(-1, keepdims=True))
  gates = np.zeros_like(logits)
  total = np.exp(pool - pool.max(-1, keepdims=True)).sum(-1, keepdims=True)
  np.put_along_axis(gates, top, weights / total, -1)
  return gates


@pytest.fixture(scope='module')
def params() -> dict:
  return random_params(moe.MoE(CFG).init, *inputs(), scale=0.5)


@pytest.fixture(scope='module')
def run_moe():
  """run_moe(params, x, mask, deterministic, key, cfg) -> (y, metrics) of the MoE, jitted once per
  (input shape, deterministic, cfg)."""
  def apply(params, x, mask, deterministic, key, cfg):
    y, state = moe.MoE(cfg).apply({'params': params}, x, mask, deterministic,
                                  rngs={'dropout': key}, mutable=['intermediates'])
    return y, moe.collect_losses(state['intermediates'])[1]
  jitted = jax.jit(apply, static_argnums=(3, 5))
  return lambda params, x, mask, deterministic=True, key=jax.random.key(0), cfg=CFG: jitted(
      params, x, mask, deterministic, key, cfg)


@pytest.fixture(scope='module')
def train_moe(params):
  """train_moe(router, key) -> ((load loss, y), grads wrt router): CFG's MoE with noise on."""
  x, mask = inputs()

  def load_loss(router, key):
    y, state = moe.MoE(CFG).apply({'params': {**params, 'router': router}}, x, mask, False,
                                  rngs={'dropout': key}, mutable=['intermediates'])
    return moe.collect_losses(state['intermediates'])[1]['load_loss'], y
  return jax.jit(jax.value_and_grad(load_loss, has_aux=True))


@pytest.mark.parametrize('k', [1, 2, 3])
def test_gates_are_a_softmax_over_the_top_k_logits(k):
  logits = np.random.default_rng(k).normal(size=(G, S, E)).astype(np.float32)
  gates, routed = map(np.asarray, jax.jit(moe.top_k_gates, static_argnums=1)(logits, k))
  np.testing.assert_allclose(gates, numpy_top_k_gates(logits, k), rtol=1e-6, atol=1e-7)
  assert ((gates > 0).sum(-1) == k).all() and (routed.sum(-1) == k).all()
  if k > 1:
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  else:  # Switch: the chosen expert's probability, below 1.
    assert (gates.sum(-1) < 1).all() and (gates.sum(-1) >= 1 / E).all()


@pytest.mark.parametrize('k', [1, 2])
def test_the_task_loss_reaches_the_router(k, params):
  """d(sum of the MoE output * r)/d(router weights) != 0 with no balancing loss, at top-1 too
  (a gate of Softmax(KeepTopK(., 1)) = 1 would give exactly 0)."""
  cfg = dataclasses.replace(CFG, moe_top_k=k, moe_noisy=False, moe_load_weight=0.0)
  x, mask = inputs()
  r = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)

  def task_loss(w_gate):
    router = {**params['router'], 'w_gate': w_gate}
    y = moe.MoE(cfg).apply({'params': {**params, 'router': router}}, x, mask,
                           mutable=['intermediates'])[0]
    return jnp.sum(y * r)
  grad = jax.grad(task_loss)(params['router']['w_gate'])
  assert float(jnp.abs(grad).max()) > 1e-3


def test_output_equals_a_slow_loop_over_experts(run_moe, params):
  """No capacity limit, noise off: y = sum over experts e of gate_e * expert_e(x)."""
  x, mask = inputs()
  mask = mask.at[1, -3:].set(False)  # Padding gets no expert output.
  y, metrics = run_moe(params, x, mask)
  gates = numpy_top_k_gates(np.asarray(x @ params['router']['w_gate']), CFG.moe_top_k)
  gates *= np.asarray(mask)[..., None]
  expert_fn = jax.jit(lambda p, x: FeedForward(CFG).apply({'params': p}, x))
  expected = np.zeros((G, S, D), np.float32)
  for e in range(E):
    expert = jax.tree.map(lambda p, e=e: p[e], params['experts'])
    expected += gates[..., e:e + 1] * np.asarray(expert_fn(expert, x))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
  assert metrics['dropped_frac'] == 0.0


def test_load_loss_has_gradient_wrt_both_router_weights(train_moe, params):
  """The smooth load estimate (not a count of routed tokens) trains W_g and W_noise."""
  _, grads = train_moe(params['router'], jax.random.key(3))
  assert float(jnp.abs(grads['w_gate']).max()) > 1e-4
  assert float(jnp.abs(grads['w_noise']).max()) > 1e-4


def test_noise_is_on_in_training_and_off_in_eval(run_moe, train_moe, params):
  x, mask = inputs()
  evals = [np.asarray(run_moe(params, x, mask, True, jax.random.key(i))[0]) for i in range(2)]
  trains = [np.asarray(train_moe(params['router'], jax.random.key(i))[0][1]) for i in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  assert np.abs(trains[0] - trains[1]).max() > 0.1 * np.abs(evals[0]).max()


def test_balancing_losses_are_minimal_for_uniform_routing():
  """Token s ranks the experts shifted by s: every expert gets each rank equally often."""
  ranks = np.arange(E, 0, -1, dtype=np.float32)
  uniform = np.broadcast_to(np.stack([np.roll(ranks, s) for s in range(S)]), (G, S, E))
  skewed = np.broadcast_to(ranks, (G, S, E))  # Every token prefers expert 0.

  @jax.jit
  def losses(logits):
    gates, routed = moe.top_k_gates(logits, 2)
    load = moe.load_probability(logits, logits, jnp.ones_like(logits), routed, 2)
    return moe.balance_losses(logits, gates, routed, jnp.ones((G, S)), load)

  balanced, unbalanced = losses(uniform), losses(skewed)
  for name in ('importance_loss', 'load_loss'):
    assert float(balanced[name]) == pytest.approx(0.0, abs=1e-6)
    assert float(unbalanced[name]) > 0.1
  assert float(balanced['switch_loss']) == pytest.approx(1.0, abs=1e-6)
  assert float(unbalanced['switch_loss']) > 1.1
  lse = np.log(np.exp(uniform).sum(-1))
  assert float(balanced['z_loss']) == pytest.approx(float(np.mean(lse ** 2)), rel=1e-6)


def test_capacity_drops_the_later_tokens_and_keeps_their_residual(run_moe, params):
  """Zero router, noise off: every token picks experts 0 and 1 (ties go to the lower index); with
  capacity 0.5 * 2 * 8 / 4 = 2 slots, tokens 2.. are dropped: they get exactly 0 from the MoE, so
  the block's residual x + 0 passes them on unchanged. Tokens 0 and 1 are served in full."""
  capped = dataclasses.replace(CFG, moe_capacity_factor=0.5)
  zero_router = {**params, 'router': jax.tree.map(jnp.zeros_like, params['router'])}
  x, mask = inputs()
  y, metrics = run_moe(zero_router, x, mask, cfg=capped)
  y_unlimited, _ = run_moe(zero_router, x, mask)
  y, y_unlimited = np.asarray(y), np.asarray(y_unlimited)
  assert not y[:, 2:].any() and y_unlimited[:, 2:].any()
  np.testing.assert_allclose(y[:, :2], y_unlimited[:, :2], rtol=1e-5, atol=1e-7)
  assert float(metrics['dropped_frac']) == 0.75
  assert float(metrics['expert_frac_max']) == 0.5 and float(metrics['expert_frac_min']) == 0.0


@pytest.mark.parametrize('capacity_factor', [0.0, 0.5])
def test_padding_does_not_change_the_outputs_or_losses(run_moe, params, capacity_factor):
  """Padding is never routed and does not count towards a row's capacity (with factor 0.5 some
  tokens are dropped: the same ones with and without the padding)."""
  cfg = dataclasses.replace(CFG, moe_capacity_factor=capacity_factor)
  x, mask = inputs()
  pad = 5 * inputs(4, seed=1)[0]  # Garbage in the padded slots.
  x_padded = jnp.concatenate([pad[:, :2], x, pad[:, 2:]], axis=1)
  mask_padded = jnp.concatenate([jnp.zeros((G, 2), bool), mask, jnp.zeros((G, 2), bool)], 1)
  y, metrics = run_moe(params, x, mask, cfg=cfg)
  y_padded, metrics_padded = run_moe(params, x_padded, mask_padded, cfg=cfg)
  assert (float(metrics['dropped_frac']) > 0) == (capacity_factor > 0)
  for name, value in metrics.items():
    assert float(metrics_padded[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
  np.testing.assert_allclose(np.asarray(y_padded[:, 2:-2]), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert not np.asarray(y_padded[:, :2]).any() and not np.asarray(y_padded[:, -2:]).any()


def test_moe_every_n_places_moe_blocks():
  cfg = ModelConfig(vocab_size=37, num_layers=4, num_heads=2, d_model=16, moe_every=2,
                    num_experts=4)
  shapes = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  blocks = [shapes['params'][f'block_{i}'] for i in range(4)]
  assert ['ffn' in b for b in blocks] == [True, False, True, False]
  assert ['moe' in b for b in blocks] == [False, True, False, True]
  assert blocks[1]['moe']['experts']['wi']['kernel'].shape == (4, 16, 64)


@pytest.mark.parametrize('kw, words', [
    (dict(moe_every=3), 'moe_every'),
    (dict(moe_top_k=5), 'moe_top_k'),
    (dict(moe_noisy=False), 'moe_noisy'),
    (dict(moe_z_weight=-1.0), 'moe_z_weight'),
])
def test_impossible_moe_configs(kw, words):
  with pytest.raises(UserError, match=words):
    ModelConfig(vocab_size=8, num_layers=2, num_heads=2, d_model=8, num_experts=4, **kw)


def check_aux_losses(config, metrics: dict, prefix: str = '') -> None:
  """Each MoE layer's aux_loss is the config-weighted sum of its losses, and every expert got
  between 1/(4M) and 4/M of the tokens."""
  m = config.model.num_experts
  for i in range(config.model.num_layers):
    if (i + 1) % config.model.moe_every:
      continue
    layer = f'{prefix}block_{i}/moe/'
    weighted = sum(config.model[key] * metrics[layer + name]
                   for name, key in moe.LOSS_WEIGHTS.items())
    assert float(metrics[layer + 'aux_loss']) == pytest.approx(float(weighted), rel=1e-5)
    assert 1 / (4 * m) <= metrics[layer + 'expert_frac_min'] <= metrics[layer + 'expert_frac_max']
    assert metrics[layer + 'expert_frac_max'] <= 4 / m


@pytest.fixture(scope='module')
def moe_lm(tiny_corpus):
  """(config, model, task, params): pretrain_moe_small's MoE settings on conftest's tiny model."""
  from experiments import pretrain_moe_small  # pylint: disable=g-import-not-at-top
  config = tiny_config(tiny_corpus)
  config.model.update({k: v for k, v in pretrain_moe_small.get_config().model.items()
                       if k.startswith('moe_') or k in ('num_experts', 'ffn_multiplier')})
  model = DecoderLM(config_lib.model_config(config, vocab_size=11))
  tokens = np.random.default_rng(0).integers(0, 11, 1000).astype(np.uint16)
  task = pretrain.make_task(config, model, tokens, tokens)
  params = random_params(model.init, jnp.zeros((1, 4), jnp.int32), scale=0.2)
  return config, model, task, params


def test_pretrain_loss_adds_the_weighted_aux_losses(moe_lm):
  config, model, task, params = moe_lm
  batch = task.eval_batches[0]

  @jax.jit
  def losses(params, key):
    loss, metrics = task.loss_fn(params, batch, key)
    logits, _ = model.apply({'params': params}, batch['inputs'], deterministic=False,
                            rngs={'dropout': key})
    return loss, metrics, lm.lm_loss(logits, batch['targets'])[0]

  loss, metrics, lm_loss = losses(params, jax.random.key(1))
  check_aux_losses(config, metrics)
  assert float(metrics['block_0/moe/aux_loss']) > 0
  assert float(loss) == pytest.approx(float(lm_loss + metrics['block_0/moe/aux_loss']), rel=1e-6)


def test_moe_lm_stays_causal_when_dropping_tokens(moe_lm):
  """Tokens are dropped in sequence order, so a change at position t never reaches logits < t."""
  _, model, task, params = moe_lm
  tokens = jnp.asarray(task.eval_batches[0]['inputs'])

  @jax.jit
  def apply(tokens):
    (logits, _), state = model.apply({'params': params}, tokens, mutable=['intermediates'])
    return logits, moe.collect_losses(state['intermediates'])[1]['block_0/moe/dropped_frac']

  (logits, dropped), t = apply(tokens), 9
  changed, _ = apply(tokens.at[:, t].set((tokens[:, t] + 1) % 11))
  diff = np.abs(np.asarray(changed - logits)).max(axis=(0, 2))
  assert float(dropped) > 0
  assert (diff[:t] == 0).all() and (diff[t:] > 0).all()


@pytest.mark.slow
def test_pretrain_moe_small_trains_with_balanced_load(tmp_path):
  """The experiment as its docstring runs it (minutes on 2 cores): every expert of every layer
  gets between 1/(4M) and 4/M of the tokens at the end."""
  from experiments import pretrain_moe_small  # pylint: disable=g-import-not-at-top
  config = pretrain_moe_small.get_config()
  result = pretrain.train(config, str(tmp_path))
  check_aux_losses(config, result.metrics, prefix='train/')
  assert result.metrics['eval/loss'] < 2.2  # 2.115 / 2.096 (seeds 0 / 1) in the docstring.


def test_flops_count_only_the_active_experts():
  """4 experts, top-2, each half as wide as a dense FFN: the per-token matmul parameters equal the
  dense model's plus the router's two [d_model, experts] matrices per MoE block."""
  dense_cfg = ModelConfig(vocab_size=16, num_layers=2, num_heads=2, d_model=D, ffn_multiplier=4.0)
  moe_cfg = dataclasses.replace(dense_cfg, ffn_multiplier=2.0, moe_every=1, num_experts=4,
                                moe_top_k=2)
  tokens = jnp.zeros((1, 4), jnp.int32)
  count = {}
  for name, cfg in (('dense', dense_cfg), ('moe', moe_cfg)):
    shapes = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), tokens)['params']
    count[name] = perf.matmul_param_count(shapes, cfg.moe_top_k / cfg.num_experts)
  assert count['moe'] == count['dense'] + 2 * (2 * D * 4)


def test_gathers_equal_the_one_hot_einsums_of_gshard():
  """dispatch/combine (gathers) against GShard's dense formulation, with dropped tokens and
  padding: the experts' inputs, the output, and the gradients wrt x, expert outputs and gates."""
  k, slots = 2, 3
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(G, S, E)), jnp.float32)
  gates, routed = moe.top_k_gates(logits, k)
  routed = routed * jnp.asarray(np.arange(S) < [[S], [S - 2]])[..., None]  # Row 1: 2 padding.
  slot, kept = moe.assign_slots(routed, jnp.array([slots, slots - 1]))  # Row 1: fewer tokens.
  assert 0 < float(kept.sum()) < float(routed.sum())  # Some tokens are dropped.
  x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
  y_experts = jnp.asarray(rng.normal(size=(E, G, slots, D)), jnp.float32)
  one_hot = kept[..., None] * jax.nn.one_hot(slot, slots)  # [G, S, E, C]

  def ours(x, y_experts, gates):
    return (moe.dispatch(x, slot, kept, slots),
            moe.combine(y_experts, gates, routed, slot, kept, k))

  def gshard(x, y_experts, gates):
    return (jnp.einsum('gsec,gsd->egcd', one_hot, x),
            jnp.einsum('gsec,egcd->gsd', one_hot * gates[..., None], y_experts))

  cotangents = (jnp.asarray(rng.normal(size=(E, G, slots, D)), jnp.float32),
                jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32))
  results = []
  for fn in (ours, gshard):
    out, vjp = jax.vjp(fn, x, y_experts, gates)
    results.append((*out, *vjp(cotangents)))
  for name, a, b in zip(['x_experts', 'y', 'dx', 'dy_experts', 'dgates'], *results):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)
