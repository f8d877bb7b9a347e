"""
The critic-free algorithms people run today, beside APA and PPO: GRPO (with its "Dr. GRPO" variant) and
RLOO. Both sample k responses per prompt (a group: `--group_size`, consecutive rows of the batch) and
take each response's advantage from the others' rewards instead of a value head. Pure functions; only
`torch` is needed.

- GRPO: Shao et al. 2024, arXiv 2402.03300, Eq. (3) and Sec. 4.1.2 (group-normalised advantages, the
  KL to pi_init as a loss term with the k3 estimator); Dr. GRPO: Liu et al. 2025, arXiv 2503.20783
  (no division by the group's std).
- RLOO: Ahmadian et al. 2024, arXiv 2402.14740, Sec. 3 (the leave-one-out baseline; the KL penalty in
  the sequence reward, as in Ziegler et al. 2019).

Which fixed point each reaches (derived here, checked by enumerating every k-tuple of a group in
test_grpo.py; softmax policies, on-policy samples, the large-batch limit of the token mean):

RLOO reaches pi* = pi_init exp(R/lambda)/Z. Its sequence reward is R' = R - lambda log(pi_old/pi_init)(y)
and A_i = R'_i - mean_{j != i} R'_j. The baseline is independent of y_i, so the expected gradient is
E_pi[R' grad log pi(y)] = grad J (the KL's own gradient, -lambda E[grad log pi], is zero). At pi* the
reward R' = lambda log Z is the same for every response: every advantage is exactly 0, in every batch.

GRPO does not. Its k3 term has, on the policy's own samples, the gradient
E_pi[(1 - pi_init/pi)(a) grad log pi(a)] = -E_{pi_init}[grad log pi] = grad KL(pi_init || pi), the forward
KL, at each state the policy visits; and its advantage is the score's alone. Write w(y) = E[A_i | y_i = y]
for the expected advantage of a response given the group it is drawn with. Setting the gradient on the
logits to 0 gives, in a bandit,
    pi(y) = pi_init(y) / (1 - (w(y) - E_pi[w]) / lambda)        (a hyperbolic tilt, not exp(R/lambda))
- Dr. GRPO (A_i = R_i - mean_j R_j): w(y) - E_pi[w] = (1 - 1/k)(R(y) - E_pi[R]), so the fixed point agrees
  with pi* for lambda k/(k-1) only to first order in R/lambda (1/(1 - x) against e^x).
- GRPO (divided by the group's std): w depends on pi and not on the scale of R (up to the eps in the std):
  the fixed point is the same for R and 3R, while pi* moves; reward differences far below lambda become
  advantages of order 1.
- Responses of several tokens: the same holds at each state s, pi(a|s) = pi_init(a|s) / (1 - (W(s, a) -
  E_pi[W(s, .)]) / lambda) with W(s, a) = E[A_i | y_i passes s, then a]; for Dr. GRPO W(s, a) - E_pi[W(s, .)]
  = (1 - 1/k)(Q_R(s, a) - V_R(s)), the score's advantage: no KL of later tokens enters (the paper's
  literal APA has the same blind spot).
Three things keep GRPO off pi*: the forward KL in place of the reverse one, an advantage that is not the
score's own scale (Dr. GRPO: scaled by 1 - 1/k; GRPO: divided by the std), and no KL of later tokens in it.
The fixed points hold in the large-batch limit; train.py's token mean over one minibatch of responses of
varying length adds a finite-sample bias, as it does for APA and PPO.
Where this departs from the papers: means are over the batch's tokens, as for APA and PPO here (GRPO
averages each response's tokens first; Dr. GRPO divides by a constant); the std is the group's sample
std (Bessel's correction, as TRL), with 1e-4 added; several epochs of minibatches reuse each batch (the
ratio and clip of PPO, as GRPO and TRL's RLOO have them).
"""
from ppo import masked_mean, ppo_policy_loss


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
    forward KL(pi_init || pi_theta) (module docstring)."""
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
