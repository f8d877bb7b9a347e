"""
PPO for RLHF, and the machinery that every algorithm here shares: masked means, whitening, the per-token
KL-penalised reward, GAE, approximate KL. Every function is pure: tensors in, and tensors out, or (loss, stats)
with the stats as Python floats (approx_kl returns a float). The file needs only torch: copy it alone.

References: PPO, Schulman et al. 2017, arXiv 1707.06347, Eq. (7) (the clipped surrogate); GAE, Schulman et al.
2016, arXiv 1506.02438, Eq. (16); the KL-penalised reward, Ziegler et al. 2019, arXiv 1909.08593, Eq. (2), spread
over tokens. The APA paper (Zhu et al. 2023, Sec. 3) uses this PPO as its baseline.

Shapes: B responses in the batch, T response tokens. `mask` (B, T) is 1 on the real response tokens (up to and
including the end-of-text token) and 0 on the right padding after it; it may also hold non-negative weights,
and then every mean is a weighted mean (the tests use this to take exact expectations over all sequences).

Where this departs from the papers: (1) the KL penalty is per token, as in every RLHF PPO since Ziegler et al.;
(2) means are over the tokens of the whole batch, as in trlx; (3) the value loss is clipped around the rollout's
values (trlx, OpenAI baselines), which the PPO paper does not do.
"""
import torch


def masked_mean(x, mask):
    """Mean of x (B, T) over the entries where mask > 0, weighted by mask. Returns a scalar."""
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, eps=1e-8, mean_fn=masked_mean):
    """(x - mean) / std over the masked entries of x (B, T); padded entries are set to 0.
    mean_fn(x, mask) takes the means: data-parallel training passes one over every process's tokens."""
    mean = mean_fn(x, mask)                                      # ()
    var = mean_fn((x - mean) ** 2, mask)                         # ()  population variance
    return torch.where(mask > 0, (x - mean) * torch.rsqrt(var + eps), 0.0)  # (B, T)


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards r_t = -kl_coef * log(pi_old/pi_init)(a_t|s_t) + [t = last token] * score.

    scores (B,) reward-model scores; logprobs, ref_logprobs (B, T) log-probs of the sampled tokens
    under the sampling policy pi_old and the frozen initial policy pi_init. Returns (B, T).
    With kl_coef = lambda, sum_t r_t is a one-sample estimate of R - lambda KL(pi_old || pi_init),
    the KL-regularised objective J(pi) whose maximiser is pi* = pi_init exp(R/lambda) / Z.
    """
    valid = (mask > 0).to(logprobs.dtype)                        # (B, T)
    rewards = -kl_coef * (logprobs - ref_logprobs) * valid       # (B, T)  KL penalty per token
    last = valid.sum(1).long() - 1                               # (B,)    index of the last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))  # (B, T)


def gae(rewards, values, mask, gamma=1.0, gae_lambda=0.95):
    """Generalised advantage estimation (GAE paper, Eq. 16) over right-padded responses.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  A_t = delta_t + gamma gae_lambda A_{t+1},  returns = A + V,
    with V = 0 after the last real token (the episode ends there). rewards, values (B, T).
    Returns (advantages, returns), both (B, T) and 0 on padding. Call it under torch.no_grad().
    """
    valid = (mask > 0).to(values.dtype)                          # (B, T)
    values, rewards = values * valid, rewards * valid            # (B, T) padding -> 0
    T = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # (B, T) V(s_{t+1})
    deltas = rewards + gamma * next_values - values              # (B, T) TD errors
    advantages = torch.zeros_like(deltas)                        # (B, T)
    running = torch.zeros_like(deltas[:, 0])                     # (B,)  A_{t+1}
    for t in reversed(range(T)):
        running = deltas[:, t] + gamma * gae_lambda * running           # (B,)  zero on padding: deltas are 0 there
        advantages[:, t] = running
    return advantages, (advantages + values) * valid


@torch.no_grad()
def approx_kl(logprobs, old_logprobs, mask):
    """KL(pi_old || pi_theta) estimated on the sampled tokens as E[(r - 1) - log r], r = pi_theta/pi_old
    (Schulman's "k3" estimator: unbiased, never negative). logprobs, old_logprobs (B, T). Returns a float."""
    log_ratio = logprobs - old_logprobs                          # (B, T)  log r_t
    return masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item()


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    """PPO's clipped surrogate (PPO paper, Eq. 7), negated to be minimised.

    L = E_t[ max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)) ],  r_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t).
    logprobs (B, T) under pi_theta (with grad); old_logprobs, advantages (B, T) from the rollout.
    Returns (pg_loss, stats): approx_kl (see `approx_kl`) and clipfrac, the fraction of tokens where
    the clipped term is the active one. At pi_theta = pi_old, with the advantages of kl_penalized_rewards and gae
    (a token mean over responses of T tokens), the gradient is -grad J / T; whitened first, as train.py does, it is
    -grad J / (T s), s the advantages' std: either way it vanishes only at pi* (docs/theory.md, section 6).
    """
    ratio = torch.exp(logprobs - old_logprobs)                   # (B, T)  r_t
    pg_loss1 = -advantages * ratio                               # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)  # (B, T)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)   # ()
    clipfrac = masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask).item()
    return pg_loss, {"approx_kl": approx_kl(logprobs, old_logprobs, mask), "clipfrac": clipfrac}


def value_loss(values, old_values, returns, mask, clip_eps=0.2):
    """Clipped value loss: 0.5 E_t[ max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) ].

    values (B, T) with grad; old_values, returns (B, T) from the rollout. Returns (vf_loss, stats).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf_loss1 = (values - returns) ** 2                           # (B, T)
    vf_loss2 = (values_clipped - returns) ** 2                   # (B, T)
    vf_loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)  # ()
    vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).to(values.dtype), mask).item()
    return vf_loss, {"vf_clipfrac": vf_clipfrac}
