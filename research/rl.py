"""The arithmetic of RLHF, as pure functions of arrays: sequence log-probs, KL estimators, GAE,
the PPO surrogate and value losses, the adaptive KL coefficient, the group-relative losses (GRPO,
Dr. GRPO, DAPO, RLOO), the DPO loss, and a reward model's normalised scores.

Conventions: a rollout is a batch of left-padded prompts [batch, prompt_len] followed by
responses [batch, resp_len]; response arrays are [batch, resp_len] with `mask` 1 on the tokens up
to and including the first EOS. Rewards, values and advantages are float32 throughout.
References: Schulman et al. 2017 (PPO), 2016 (GAE); Ziegler et al. 2019 (adaptive KL); Huang et
al. 2024 ("The N Implementation Details of RLHF with PPO"); Rafailov et al. 2023 (DPO); the group
losses' papers by their switch (`GROUP_LOSSES`).
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray, axis=None) -> jnp.ndarray:
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def whiten(x: jnp.ndarray, mask: jnp.ndarray, shift_mean: bool = True) -> jnp.ndarray:
  """(x - mean) / std over the masked entries (the mean kept when not shift_mean)."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return out if shift_mean else out + mean


def token_logprobs(logits: jnp.ndarray, tokens: jnp.ndarray,
                   temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(log p(token), entropy) per position of logits [batch, len, vocab] at temperature; tokens
  [batch, len]. Both [batch, len], float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  entropy = -(jnp.exp(logp) * logp).sum(-1)
  return chosen, entropy


def response_mask(responses: jnp.ndarray, eos_id: int) -> jnp.ndarray:
  """1.0 on each row's tokens up to and including its first EOS (all of them without EOS).
  responses: int [batch, resp_len] -> float32 [batch, resp_len]."""
  is_eos = (responses == eos_id).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  return (eos_before == 0).astype(jnp.float32)


def last_index(mask: jnp.ndarray) -> jnp.ndarray:
  """Index of the last nonzero entry of each row of mask [batch, len] -> int32 [batch]."""
  length = mask.shape[1]
  return (length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)


KL_ESTIMATORS = ('k1', 'k3')


def kl_estimate(logp: jnp.ndarray, ref_logp: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens.

  'k1': logp - ref_logp (unbiased, can be negative); 'k3': (r - 1) - log r with r = p_ref / p
  (unbiased, never negative; Schulman 2020, "Approximating KL divergence").
  """
  if kind == 'k1':
    return logp - ref_logp
  if kind == 'k3':
    log_ratio = ref_logp - logp
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f'unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}')


def token_rewards(score: jnp.ndarray, kl: jnp.ndarray, mask: jnp.ndarray,
                  beta: jnp.ndarray) -> jnp.ndarray:
  """-beta * KL_t on every response token, plus the sequence score [batch] on its last token.
  Returns float32 [batch, resp_len]."""
  rewards = -beta * kl * mask
  last = jax.nn.one_hot(last_index(mask), mask.shape[1], dtype=jnp.float32)
  return (rewards + last * score[:, None]).astype(jnp.float32)


def gae(rewards: jnp.ndarray, values: jnp.ndarray, mask: jnp.ndarray, gamma: float,
        lam: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Generalised advantage estimation by a reverse scan over time.

  rewards, values, mask: [batch, resp_len]; the value after the last masked token is 0.
  Returns (advantages, returns = advantages + values), float32 [batch, resp_len], 0 off the mask.
  """
  rewards, values = rewards * mask, values * mask

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = (delta + gamma * lam * next_adv) * m
    return (v, adv), adv

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T.astype(jnp.float32)
  return adv, (adv + values) * mask


def policy_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, advantages: jnp.ndarray,
                mask: jnp.ndarray, clip: float) -> tuple[jnp.ndarray, dict]:
  """PPO's clipped surrogate, mean over masked tokens, with the clip fraction and approximate KL
  (mean of (ratio - 1) - log ratio) between the old and new policy."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  return loss, {'clip_frac': masked_mean((clipped > unclipped).astype(jnp.float32), mask),
                'approx_kl': masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}


def value_loss(values: jnp.ndarray, old_values: jnp.ndarray, returns: jnp.ndarray,
               mask: jnp.ndarray, clip: float) -> jnp.ndarray:
  """0.5 * the larger of the squared errors of the new and of the clipped values, masked mean."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: jnp.ndarray, returns: jnp.ndarray, mask: jnp.ndarray
                       ) -> jnp.ndarray:
  """1 - Var[returns - values] / Var[returns] over masked entries (1 = perfect, 0 = a constant)."""
  var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)
  return 1 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def adaptive_beta(beta: float, kl: float, target: float, horizon: int, batch_size: int) -> float:
  """Ziegler et al. 2019: beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon."""
  error = float(np.clip(kl / target - 1, -0.2, 0.2))
  return beta * (1 + error * batch_size / horizon)


# Group-relative policy optimisation and its corrections, one switch (`GROUP_LOSSES`):
#   'grpo'    Shao et al. 2024 (DeepSeekMath): advantages (r - group mean) / group std; each
#             sequence's token losses averaged over its length, then over sequences.
#   'dr_grpo' Liu et al. 2025 ("Understanding R1-Zero-like training"): no std division, and token
#             losses summed per sequence and divided by a constant (the longest possible reply),
#             so neither short nor long replies are favoured.
#   'dapo'    Yu et al. 2025: GRPO's advantages; token-level loss (all tokens of the batch weigh
#             the same); clip-higher (separate low/high epsilons), dynamic sampling and overlong
#             shaping (`keep_informative_groups`, `overlong_penalty`).
#   'rloo'    Ahmadian et al. 2024: leave-one-out baseline, r - mean of the other replies of the
#             group; losses as GRPO's.
GROUP_LOSSES = ('grpo', 'dr_grpo', 'dapo', 'rloo')


def group_advantages(rewards: jnp.ndarray, kind: str, eps: float = 1e-6) -> jnp.ndarray:
  """Advantages [prompts, group] of rewards [prompts, group] (G replies per prompt), float32; 0
  for every reply of a group whose rewards are all equal."""
  rewards = rewards.astype(jnp.float32)
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  if kind in ('grpo', 'dapo'):
    std = rewards.std(axis=1, keepdims=True)
    return jnp.where(std > eps, centred / (std + eps), 0.0)
  if kind == 'dr_grpo':
    return centred
  if kind == 'rloo':
    g = rewards.shape[1]
    return centred * g / (g - 1)  # r_i - mean of the other g - 1.
  raise ValueError(f'unknown group loss {kind!r}; expected one of {GROUP_LOSSES}')


def group_policy_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, advantages: jnp.ndarray,
                      mask: jnp.ndarray, kind: str, clip_low: float, clip_high: float
                      ) -> tuple[jnp.ndarray, dict]:
  """The clipped importance-ratio surrogate of a batch of replies, normalised as `kind` says.

  logp, old_logp, mask: [batch, resp_len]; advantages: [batch] (one per reply, the same on each of
  its tokens). The ratio is clipped to [1 - clip_low, 1 + clip_high]. Metrics: the clipped share
  of tokens and the approximate KL between the old and new policy.
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  adv = advantages[:, None].astype(jnp.float32)
  unclipped, clipped = -adv * ratio, -adv * jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
  token_loss = jnp.maximum(unclipped, clipped) * mask
  if kind == 'dapo':
    loss = token_loss.sum() / jnp.maximum(mask.sum(), 1.0)
  elif kind == 'dr_grpo':
    loss = (token_loss.sum(axis=1) / mask.shape[1]).mean()
  elif kind in ('grpo', 'rloo'):
    loss = (token_loss.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)).mean()
  else:
    raise ValueError(f'unknown group loss {kind!r}; expected one of {GROUP_LOSSES}')
  return loss, {'clip_frac': masked_mean((clipped > unclipped).astype(jnp.float32), mask),
                'approx_kl': masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}


def keep_informative_groups(rewards: np.ndarray) -> np.ndarray:
  """DAPO's dynamic sampling: bool [prompts], the groups of rewards [prompts, group] whose
  rewards differ (a group whose replies all score the same has no gradient)."""
  return np.ptp(np.asarray(rewards), axis=1) > 0


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong punishment of replies of `lengths` tokens (at most max_len): 0 up to
  max_len - buffer, then falling linearly to -1 at max_len."""
  lengths = np.asarray(lengths, np.float32)
  return np.clip((max_len - buffer - lengths) / max(buffer, 1), -1.0, 0.0)


def dpo_loss(logp: jnp.ndarray, ref_logp: jnp.ndarray, beta: float,
             chosen_tokens: jnp.ndarray | None = None, nll_coef: float = 0.0
             ) -> tuple[jnp.ndarray, dict]:
  """-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), mean over pairs, plus nll_coef
  times the chosen answers' mean per-token NLL -logp_c / chosen_tokens (RPO, Pang et al. 2024).

  logp, ref_logp: summed completion log-probs [pairs, 2], chosen then rejected; chosen_tokens:
  [pairs], the chosen completions' lengths (needed for the NLL term and its metric). Metrics: the
  implicit rewards beta * (logp - ref_logp) of each side, their margin, how often it is > 0, and
  the DPO term alone.
  """
  rewards = beta * (logp - ref_logp)
  margin = rewards[:, 0] - rewards[:, 1]
  loss = -jax.nn.log_sigmoid(margin).mean()
  metrics = {'reward_chosen': rewards[:, 0].mean(), 'reward_rejected': rewards[:, 1].mean(),
             'margin': margin.mean(), 'accuracy': (margin > 0).mean(), 'dpo_loss': loss}
  if chosen_tokens is not None:
    metrics['chosen_nll'] = -(logp[:, 0] / jnp.maximum(chosen_tokens, 1)).mean()
    loss += nll_coef * metrics['chosen_nll']
  return loss, metrics


def join(prompts: jnp.ndarray, prompt_mask: jnp.ndarray, responses: jnp.ndarray,
         eos_id: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Left-padded prompts [batch, prompt_len] (+ mask) and responses [batch, resp_len] as one
  sequence: (tokens, positions, segment_ids) [batch, prompt_len + resp_len] for the model (segment
  0 on padding and after EOS) and the response mask [batch, resp_len]."""
  mask = response_mask(responses, eos_id)
  segments = jnp.concatenate([prompt_mask.astype(jnp.int32), mask.astype(jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  return jnp.concatenate([prompts, responses], axis=1), positions, segments, mask


def response_window(x: jnp.ndarray, resp_len: int) -> jnp.ndarray:
  """The model outputs [batch, prompt_len + resp_len, ...] that predict the response tokens:
  those at positions prompt_len - 1 ... prompt_len + resp_len - 2."""
  return x[:, -resp_len - 1:-1]


def last_token_scores(model: nn.Module, params: Any, tokens: jnp.ndarray,
                      positions: jnp.ndarray | None, segment_ids: jnp.ndarray) -> jnp.ndarray:
  """The scalar head at each row's last non-padding token (segment_ids > 0): [batch]."""
  scores = model.apply({'params': params}, tokens, positions, segment_ids)
  return jnp.take_along_axis(scores, last_index(segment_ids)[:, None], axis=1)[:, 0]


@flax.struct.dataclass
class RewardModel:
  """A reward model with its normalisation (a pytree: pass it to jitted functions)."""
  model: nn.Module = flax.struct.field(pytree_node=False)  # A ScalarLM.
  params: Any
  gain: float
  bias: float

  def score(self, tokens: jnp.ndarray, positions: jnp.ndarray,
            segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Normalised rewards [batch] of sequences [batch, len] at their last non-padding token."""
    raw = last_token_scores(self.model, self.params, tokens, positions, segment_ids)
    return self.gain * raw + self.bias
