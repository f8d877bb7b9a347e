"""
The critic-free algorithms people run today, beside APA and PPO: GRPO (with its "Dr. GRPO" variant) and RLOO.
Both sample k responses per prompt (a group: --group_size, consecutive rows of the batch) and take each
response's advantage from the others' rewards instead of a value head. Pure functions; only torch is needed.

- GRPO: Shao et al. 2024, arXiv 2402.03300, Eq. (3) and Sec. 4.1.2: group-normalised advantages, and the KL to
  pi_init as a loss term with the k3 estimator. Dr. GRPO: Liu et al. 2025, arXiv 2503.20783 (no division by the
  group's std).
- RLOO: Ahmadian et al. 2024, arXiv 2402.14740, Sec. 3: the leave-one-out baseline, with the KL penalty in the
  sequence reward, as in Ziegler et al. 2019.

RLOO's fixed point is pi* = pi_init exp(R/lambda) / Z; GRPO's and Dr. GRPO's are hyperbolic tilts of pi_init,
not pi* (docs/theory.md, section 7, derives them; tests/test_grpo.py checks them by enumerating every group).
Where this departs from the papers: means are over the batch's tokens, as for APA and PPO here; the std is the
group's sample std (Bessel's correction, as TRL), with 1e-4 added; several epochs of minibatches reuse each batch.
"""
from ppo import masked_mean, ppo_policy_loss

CRITIC_FREE = ("grpo", "rloo")   # train.py's --algo values of this file: advantages from the group, no value head


def group_advantages(scores, group_size, std=True, eps=1e-4):
    """GRPO's advantage of each response: (R_i - mean) / (std + eps) over its group (Dr. GRPO: std=False,
    R_i - mean). scores (B,), groups of group_size consecutive rows. Returns (B,)."""
    groups = scores.view(-1, group_size)                         # (B/k, k)
    adv = groups - groups.mean(1, keepdim=True)                  # (B/k, k) R_i - mean of the group
    if std:
        adv = adv / (groups.std(1, keepdim=True) + eps)          # (B/k, k) sample std (Bessel), as TRL
    return adv.flatten()                                         # (B,)


def rloo_advantages(rewards, group_size):
    """RLOO's advantage: R'_i - mean_{j != i} R'_j, the leave-one-out baseline, over each group.
    rewards (B,) sequence rewards R' = R - lambda KL estimate, groups of group_size consecutive rows.
    Returns (B,)."""
    groups = rewards.view(-1, group_size)                        # (B/k, k)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (B/k, k) mean of the other k - 1
    return (groups - others).flatten()                           # (B,)


def k3(logprobs, ref_logprobs):
    """Schulman's k3 estimate of KL(pi_theta || pi_init) per token, as GRPO uses it: r - log r - 1 with
    r = pi_init/pi_theta on the sampled token (B, T). Its gradient on pi_theta's samples is that of the
    forward KL(pi_init || pi_theta), not the reverse KL that J carries (docs/theory.md, section 7)."""
    log_r = ref_logprobs - logprobs                              # (B, T) log pi_init/pi_theta
    return log_r.exp() - log_r - 1                               # (B, T)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, lam, clip_eps=0.2):
    """GRPO's loss (Shao et al. 2024, Eq. 3), negated to be minimised: PPO's clipped surrogate with the
    response's group advantage on every token, plus lambda times the k3 KL to pi_init.

        L = E_t[ max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) + lambda k3_t ],  r_t = pi_theta/pi_old(a_t|s_t)

    logprobs (B, T) with grad; old_logprobs, ref_logprobs (B, T) under pi_old and pi_init; advantages
    (B, T), `group_advantages` broadcast over each response's tokens; mask (B, T). Returns (pg_loss, stats).
    """
    pg_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)  # ()
    kl = masked_mean(k3(logprobs, ref_logprobs), mask)           # ()     k3 KL to pi_init
    return pg_loss + lam * kl, dict(stats, k3=kl.item())
