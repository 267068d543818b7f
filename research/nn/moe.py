"""Mixture-of-Experts feed-forward: noisy top-k router, capacity-limited experts, balancing losses.

Noisy top-k gating and the importance and load losses follow Shazeer et al. 2017; the per-expert
capacity and its slots in token order follow GShard (Lepikhin et al. 2020), though tokens reach
their slots by gathers instead of GShard's one-hot einsums (whose [G, S, E, C] x [G, S, D]
products spend a third of the experts' FLOPs on copying rows at bench/train_throughput.py's (d);
the gathers make its step 15% faster); the aux loss follows the Switch Transformer (Fedus et al.
2021) and the router z-loss ST-MoE (Zoph et al. 2022).

Letters in tensor names: G groups (the batch rows), S tokens per group (the sequence), E experts,
C capacity (slots per expert and group), K experts per token, D d_model.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.nn.config import ModelConfig
from research.nn.ffn import FeedForward
from research.nn.partitioning import constrain

NOISE_EPSILON = 1e-2  # Floor of the gate noise's standard deviation (Shazeer et al. 2017).
# Each balancing loss and the ModelConfig field that weighs it in the training loss.
LOSS_WEIGHTS = {'importance_loss': 'moe_importance_weight', 'load_loss': 'moe_load_weight',
                'switch_loss': 'moe_switch_weight', 'z_loss': 'moe_z_weight'}


def top_k_gates(logits_GxSxE: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax(KeepTopK(logits, k)): (gates, routed), both float32 [G, S, E].

  gates are the softmax over each token's k largest logits and 0 elsewhere; routed is 1 on those
  k experts and 0 elsewhere. At k = 1 that softmax would be 1 whatever the logits, and the task
  loss would never reach the router: the gate is then the Switch Transformer's (Fedus et al.
  2021), the softmax over all E logits at the chosen expert.
  """
  logits_GxSxE = logits_GxSxE.astype(jnp.float32)
  top_GxSxK, expert_GxSxK = jax.lax.top_k(logits_GxSxE, k)
  onehot_GxSxKxE = jax.nn.one_hot(expert_GxSxK, logits_GxSxE.shape[-1], dtype=jnp.float32)
  routed_GxSxE = onehot_GxSxKxE.sum(axis=2)
  if k == 1:
    return jax.nn.softmax(logits_GxSxE, axis=-1) * routed_GxSxE, routed_GxSxE
  gates_GxSxE = jnp.einsum('gsk,gske->gse', jax.nn.softmax(top_GxSxK, axis=-1), onehot_GxSxKxE)
  return gates_GxSxE, routed_GxSxE


def load_probability(clean_GxSxE: jnp.ndarray, noisy_GxSxE: jnp.ndarray, noise_std_GxSxE:
                     jnp.ndarray, routed_GxSxE: jnp.ndarray, k: int) -> jnp.ndarray:
  """P(x, i): the probability that expert i stays in the top k if only its own noise is redrawn.

  P = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i), where the k-th largest noisy
  logit excluding i is the (k+1)-th largest overall for a routed expert and the k-th otherwise.
  Smooth in the router weights, unlike a count of routed tokens. All [G, S, E], float32.
  """
  if k == noisy_GxSxE.shape[-1]:  # Every expert is routed: none can drop out of the top k.
    return jnp.ones_like(clean_GxSxE)
  top_GxSxKplus1 = jax.lax.top_k(noisy_GxSxE, k + 1)[0]
  threshold_GxSxE = jnp.where(routed_GxSxE > 0, top_GxSxKplus1[..., k:],
                              top_GxSxKplus1[..., k - 1:k])
  return jax.scipy.stats.norm.cdf((clean_GxSxE - threshold_GxSxE) / noise_std_GxSxE)


def cv_squared(x_E: jnp.ndarray) -> jnp.ndarray:
  """Squared coefficient of variation, var / mean^2: 0 when all entries are equal."""
  return jnp.var(x_E) / (jnp.mean(x_E) ** 2 + 1e-10)


def balance_losses(logits_GxSxE: jnp.ndarray, gates_GxSxE: jnp.ndarray, routed_GxSxE: jnp.ndarray,
                   token_mask_GxS: jnp.ndarray, load_GxSxE: jnp.ndarray | None = None
                   ) -> dict[str, jnp.ndarray]:
  """The balancing losses over the tokens with token_mask 1 (padding excluded), float32 scalars.

  importance: CV(sum_x G(x))^2. load: CV(sum_x P(x, i))^2 from `load_probability` (only when it is
  given). switch: E * sum_i f_i p_i, f_i the fraction of routed (token, expert) pairs and p_i the
  mean router probability of expert i; 1 when balanced. z: mean over tokens of
  logsumexp(logits)^2.
  """
  mask_GxS = token_mask_GxS.astype(jnp.float32)
  tokens = jnp.maximum(mask_GxS.sum(), 1.0)
  masked_sum = lambda t_GxSxE: jnp.einsum('gse,gs->e', t_GxSxE, mask_GxS)
  routed_E = masked_sum(routed_GxSxE)
  probs_E = masked_sum(jax.nn.softmax(logits_GxSxE, axis=-1)) / tokens
  lse_GxS = jax.nn.logsumexp(logits_GxSxE, axis=-1)
  losses = {
      'importance_loss': cv_squared(masked_sum(gates_GxSxE)),
      'switch_loss': logits_GxSxE.shape[-1] * jnp.sum(
          routed_E / jnp.maximum(routed_E.sum(), 1.0) * probs_E),
      'z_loss': (lse_GxS ** 2 * mask_GxS).sum() / tokens,
  }
  if load_GxSxE is not None:
    losses['load_loss'] = cv_squared(masked_sum(load_GxSxE))
  return losses


def capacity(cfg: ModelConfig, group_size: int) -> int:
  """Slots per expert and group: capacity_factor * top_k * group_size / num_experts, rounded up;
  group_size (nothing dropped) when capacity_factor <= 0. A group is a row, and its size counts
  its tokens, not its padding (`row_capacity`), so a cached decode step (one token per row)
  always finds a slot: generation never drops a token, while a full-sequence pass (training,
  eval, PPO's log-probs) may, as in GShard and Switch."""
  if cfg.moe_capacity_factor <= 0:
    return group_size
  slots = math.ceil(cfg.moe_capacity_factor * cfg.moe_top_k * group_size / cfg.num_experts)
  return min(group_size, slots)


def row_capacity(cfg: ModelConfig, token_mask_GxS: jnp.ndarray) -> jnp.ndarray:
  """int32 [G]: `capacity` of each row's tokens (padding excluded), so that a row's outputs do not
  depend on how much padding it shares a batch with."""
  table = np.array([capacity(cfg, n) for n in range(token_mask_GxS.shape[1] + 1)], np.int32)
  return jnp.asarray(table)[token_mask_GxS.sum(axis=1)]


def assign_slots(routed_GxSxE: jnp.ndarray, slots_G: jnp.ndarray) -> tuple[jnp.ndarray,
                                                                           jnp.ndarray]:
  """(slot [G, S, E] int32, kept [G, S, E] float32): token s fills the next free slot of each of
  its experts in sequence order, so an overfull expert drops its later tokens (and a token's
  routing never depends on later tokens). kept is 1 where a routed token got a slot below its
  row's slots_G [G]."""
  slot_GxSxE = jnp.cumsum(routed_GxSxE, axis=1).astype(jnp.int32) - 1
  return slot_GxSxE, routed_GxSxE * (slot_GxSxE < slots_G[:, None, None])


def dispatch(x_GxSxD: jnp.ndarray, slot_GxSxE: jnp.ndarray, kept_GxSxE: jnp.ndarray,
             num_slots: int) -> jnp.ndarray:
  """Each expert's inputs [E, G, C, D], C = num_slots: slot c of expert e in group g holds the
  token that `assign_slots` put there (zeros in empty slots). A gather: the token in slot c is
  the number of tokens whose running count of kept tokens is still <= c."""
  g, s, d = x_GxSxD.shape
  count_GxSxE = jnp.cumsum(kept_GxSxE, axis=1)
  token_GxExC = jnp.sum(count_GxSxE[..., None] <= jnp.arange(num_slots), axis=1)  # s, or S.
  row_ExGxC = jnp.where(token_GxExC < s, token_GxExC + s * jnp.arange(g)[:, None, None],
                        g * s).transpose(1, 0, 2)  # g * s: out of range, filled with 0.
  return jnp.take(x_GxSxD.reshape(g * s, d), row_ExGxC, axis=0, mode='fill', fill_value=0)


def combine(y_ExGxCxD: jnp.ndarray, gates_GxSxE: jnp.ndarray, routed_GxSxE: jnp.ndarray,
            slot_GxSxE: jnp.ndarray, kept_GxSxE: jnp.ndarray, k: int) -> jnp.ndarray:
  """[G, S, D]: each token's sum over its k routed experts of gate * that expert's output in the
  token's slot; a gather of k rows per token. A dropped token's (or padding's) weight is 0, so
  the row it reads does not matter (an index out of range reads 0)."""
  e, g, c, d = y_ExGxCxD.shape
  expert_GxSxK = jax.lax.top_k(routed_GxSxE, k)[1]
  pick = lambda t_GxSxE: jnp.take_along_axis(t_GxSxE, expert_GxSxK, axis=-1)
  weight_GxSxK = pick(gates_GxSxE * kept_GxSxE)
  row_GxSxK = (expert_GxSxK * g + jnp.arange(g)[:, None, None]) * c + pick(slot_GxSxE)
  y_GxSxKxD = jnp.take(y_ExGxCxD.reshape(e * g * c, d), row_GxSxK, axis=0, mode='fill',
                       fill_value=0)
  return jnp.einsum('gsk,gskd->gsd', weight_GxSxK.astype(y_GxSxKxD.dtype), y_GxSxKxD)


class Router(nn.Module):
  """Noisy top-k gating (Shazeer et al. 2017), W_g and W_noise zero-initialised.

  H(x) = x W_g + StandardNormal() * (Softplus(x W_noise) + eps), the noise drawn from the 'dropout'
  rng in training only (and never without cfg.moe_noisy); G(x) = Softmax(KeepTopK(H(x), k))
  (Switch's gate at k = 1: see `top_k_gates`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_GxSxD: jnp.ndarray, deterministic: bool = True) -> tuple[
      jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """x: [batch, seq, d_model] -> (H, gates, routed, load P or None), float32 [batch, seq, E]."""
    cfg = self.cfg
    shape = (x_GxSxD.shape[-1], cfg.num_experts)
    x_GxSxD = x_GxSxD.astype(jnp.float32)
    clean_GxSxE = x_GxSxD @ self.param('w_gate', nn.initializers.zeros, shape)
    if not cfg.moe_noisy:
      return clean_GxSxE, *top_k_gates(clean_GxSxE, cfg.moe_top_k), None
    w_noise = self.param('w_noise', nn.initializers.zeros, shape)
    noise_std_GxSxE = nn.softplus(x_GxSxD @ w_noise) + NOISE_EPSILON
    logits_GxSxE = clean_GxSxE
    if not deterministic:
      normal_GxSxE = jax.random.normal(self.make_rng('dropout'), clean_GxSxE.shape)
      logits_GxSxE = clean_GxSxE + normal_GxSxE * noise_std_GxSxE
    gates_GxSxE, routed_GxSxE = top_k_gates(logits_GxSxE, cfg.moe_top_k)
    load_GxSxE = load_probability(clean_GxSxE, logits_GxSxE, noise_std_GxSxE, routed_GxSxE,
                                  cfg.moe_top_k)
    return logits_GxSxE, gates_GxSxE, routed_GxSxE, load_GxSxE


class MoE(nn.Module):
  """x [batch, seq, d_model] -> [batch, seq, d_model]: each token through its top-k experts.

  Experts are `FeedForward`s of cfg.ffn and cfg.ffn_dim with params stacked on a leading expert
  axis ([num_experts, d_model, ffn_dim] ...), so that axis can be sharded. A token dropped by an
  expert gets nothing from it (its residual passes unchanged). The balancing losses and routing
  metrics are sown into 'intermediates' (read them with `collect_losses`).
  """
  cfg: ModelConfig
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x_GxSxD: jnp.ndarray, token_mask_GxS: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """token_mask: [batch, seq], 0 for padding (never routed, excluded from the losses)."""
    cfg = self.cfg
    logits_GxSxE, gates_GxSxE, routed_GxSxE, load_GxSxE = Router(cfg, name='router')(
        x_GxSxD, deterministic)
    routed_GxSxE *= token_mask_GxS[..., None]
    num_slots = capacity(cfg, x_GxSxD.shape[1])  # The most any row gets.
    slot_GxSxE, kept_GxSxE = assign_slots(routed_GxSxE, row_capacity(cfg, token_mask_GxS))
    experts = nn.vmap(FeedForward, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=0, out_axes=0, axis_size=cfg.num_experts)
    dispatched = ('experts', 'batch', None, 'embed')
    x_ExGxCxD = constrain(dispatch(x_GxSxD.astype(cfg.dtype), slot_GxSxE, kept_GxSxE, num_slots),
                          dispatched)
    y_ExGxCxD = constrain(experts(cfg, self.out_scale, pin=False, name='experts')(x_ExGxCxD),
                          dispatched)
    y_GxSxD = combine(y_ExGxCxD, gates_GxSxE, routed_GxSxE, slot_GxSxE, kept_GxSxE,
                      cfg.moe_top_k)

    losses = balance_losses(logits_GxSxE, gates_GxSxE, routed_GxSxE, token_mask_GxS, load_GxSxE)
    routed_E = routed_GxSxE.sum(axis=(0, 1))
    total = jnp.maximum(routed_E.sum(), 1.0)
    self.sow('intermediates', 'moe_metrics', {
        **losses,
        'aux_loss': sum(getattr(cfg, LOSS_WEIGHTS[name]) * loss for name, loss in losses.items()),
        'expert_frac_max': routed_E.max() / total,
        'expert_frac_min': routed_E.min() / total,
        'dropped_frac': 1.0 - kept_GxSxE.sum() / total,
    })
    return y_GxSxD.astype(x_GxSxD.dtype)


def collect_losses(intermediates: dict) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """(sum of every MoE layer's weighted aux loss, metrics named '<module path>/<metric>').

  intermediates: the 'intermediates' collection of an apply with mutable=['intermediates'];
  (0.0, {}) for a dense model.
  """
  aux_loss, metrics = jnp.zeros((), jnp.float32), {}
  for path, (layer_metrics,) in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != 'moe_metrics':
      continue
    aux_loss += layer_metrics['aux_loss'].sum()  # Scanned layers sow [num_layers] values.
    metrics.update({'/'.join(path[:-1] + (name,)): value.mean()
                    for name, value in layer_metrics.items()})
  return aux_loss, metrics
