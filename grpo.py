"""
The critic-free algorithms people run today, beside APA and PPO: GRPO (with its "Dr. GRPO" variant) and RLOO.
Both sample k responses per prompt (a group: --group_size, consecutive rows of the batch) and take each
response's advantage from the others' rewards instead of a value head. Pure functions: tensors in, and tensors
out, or (loss, stats) with the stats as Python floats. The file needs only torch: copy it alone.

- GRPO: Shao et al. 2024, arXiv 2402.03300, Eq. (3) and Sec. 4.1.2: group-normalised advantages, and the KL to
  pi_init as a loss term with the k3 estimator. Dr. GRPO: Liu et al. 2025, arXiv 2503.20783 (no division by the
  group's std).
- RLOO: Ahmadian et al. 2024, arXiv 2402.14740, Sec. 3: the leave-one-out baseline, with the KL penalty in the
  sequence reward, as in Ziegler et al. 2019.

RLOO's fixed point is pi* = pi_init exp(R/lambda) / Z; GRPO's and Dr. GRPO's are hyperbolic tilts of pi_init,
not pi* (docs/theory.md, section 7, derives them; tests/test_grpo.py checks them by enumerating every group).
Where the KL to pi_init goes (train.py --kl) is a choice of its own: in the sequence reward (RLOO's), or in
the loss by one of four estimators (k1, k2, k3 and k3 x ratio; GRPO's is k3). docs/theory.md, section 8, derives
the fixed point of each, with each algorithm's advantages.
Where this departs from the papers: means are over the batch's tokens, as for APA and PPO here; the std is the
group's sample std (Bessel's correction, as TRL), with 1e-4 added; several epochs of minibatches reuse each batch.
"""
import torch

CRITIC_FREE = ("grpo", "rloo")   # train.py's --algo values of this file: advantages from the group, no value head


def masked_mean(x, mask):
    """Mean of x (B, T) over the entries where mask > 0, weighted by mask. Returns a scalar."""
    return (x * mask).sum() / mask.sum()


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


# the KL to pi_init as a loss term: four per-token estimates of KL(pi_theta || pi_init) on the sampled tokens, each
# (logprobs, ref_logprobs, old_logprobs) -> (B, T). Their expected gradients on the policy's own samples differ:
# docs/theory.md, section 8, derives each, and the fixed point each reaches with each algorithm's advantages.

def k1(logprobs, ref_logprobs, old_logprobs=None):
    """log pi_theta/pi_init: unbiased for the KL, but its expected gradient at pi_theta = pi_old is 0, so nothing
    pulls the policy towards pi_init (within an update, it pushes pi_theta away from pi_old)."""
    return logprobs - ref_logprobs                               # (B, T)


def k2(logprobs, ref_logprobs, old_logprobs=None):
    """1/2 (log pi_theta/pi_init)^2: its expected gradient is that of the reverse KL(pi_theta || pi_init) at each
    state, the KL that J carries (but not the KL of the later tokens)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2                  # (B, T)


def k3(logprobs, ref_logprobs, old_logprobs=None):
    """Schulman's k3, as GRPO uses it: r - log r - 1 with r = pi_init/pi_theta on the sampled token. Its expected
    gradient on pi_theta's samples is that of the forward KL(pi_init(.|s) || pi_theta(.|s)) at each state s, the
    states weighted by pi_theta's own visits: not the reverse KL that J carries, nor the forward KL of whole
    responses (which weights the states by pi_init's visits)."""
    log_r = ref_logprobs - logprobs                              # (B, T) log pi_init/pi_theta
    return log_r.exp() - log_r - 1                               # (B, T)


def k3_is(logprobs, ref_logprobs, old_logprobs):
    """k3 times the ratio pi_theta/pi_old (DeepSeek-V3.2's importance-sampling correction): its expected gradient
    is that of the reverse KL, as k2's."""
    return torch.exp(logprobs - old_logprobs) * k3(logprobs, ref_logprobs)  # (B, T)


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3, "k3_is": k3_is}  # train.py's --kl values in the loss


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, lam, clip_eps=0.2, kl_estimator=k3):
    """GRPO's loss (Shao et al. 2024, Eq. 3), negated to be minimised: PPO's clipped surrogate with the
    response's group advantage on every token, plus lambda times an estimate of the KL to pi_init (k3 in GRPO).

        L = E_t[ max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) + lambda k3_t ],  r_t = pi_theta/pi_old(a_t|s_t)

    logprobs (B, T) with grad; old_logprobs, ref_logprobs (B, T) under pi_old and pi_init; advantages
    (B, T), the group's advantage broadcast over each response's tokens; mask (B, T); kl_estimator: one of
    KL_ESTIMATORS, or None when the KL is in the sequence reward instead (RLOO's place): then the loss is the
    clipped surrogate alone. Returns (pg_loss, stats): approx_kl = E[(r - 1) - log r], the KL(pi_old || pi_theta)
    that train.py's KL guard reads; clipfrac, the share of tokens whose clipped term is active; and the KL term
    under the estimator's name (k3: ...). The stats are Python floats.
    """
    ratio = torch.exp(logprobs - old_logprobs)                   # (B, T) r_t
    pg_loss1 = -advantages * ratio                               # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)  # (B, T)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)   # () the clipped surrogate
    log_ratio = (logprobs - old_logprobs).detach()               # (B, T) log r_t
    stats = {"approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item(),
             "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask).item()}
    if kl_estimator is None:
        return pg_loss, stats
    kl = masked_mean(kl_estimator(logprobs, ref_logprobs, old_logprobs), mask)  # () the KL term
    return pg_loss + lam * kl, dict(stats, **{kl_estimator.__name__: kl.item()})
