"""
The APA loss (Zhu et al. 2023, arXiv 2306.02231, Sec. 3), and AWR, the paper's third algorithm. Pure functions:
tensors in, (loss, stats) out, with the stats as Python floats. The file needs only torch: copy it alone.

APA regresses the policy's log-probability onto a target policy built from the advantage:

    L_APA(theta) = E_{(s,a) ~ pi_old} [ ( log pi_theta(a|s) - log pi_anchor(a|s) - Adv(s,a)/lambda )^2 ]

The paper anchors on pi_init, with Adv from the reward model's score alone. apa_loss anchors on pi_old by
default, with Adv from the per-token KL-penalised reward (ppo.kl_penalized_rewards with kl_coef = lambda): then
the loss is stationary exactly where Adv = 0 everywhere, which is the soft Bellman equation, so its fixed point is
exactly pi* = pi_init exp(R/lambda) / Z. The paper's form (ref_logprobs given, no KL in the reward) ignores the
KL that later tokens pay, and misses pi* for responses longer than one token. docs/theory.md derives both, the
mix of the two, bounded APA and AWR; test_losses.py checks each numerically.
"""
import torch


def masked_mean(x, mask):
    """Mean of x (B, T) over the entries where mask > 0, weighted by mask. Returns a scalar."""
    return (x * mask).sum() / mask.sum()


@torch.no_grad()
def approx_kl(logprobs, old_logprobs, mask):
    """KL(pi_old || pi_theta) on the sampled tokens, E[(r - 1) - log r] with r = pi_theta/pi_old. Returns a float."""
    log_ratio = logprobs - old_logprobs                          # (B, T)  log r_t
    return masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item()


def apa_loss(logprobs, old_logprobs, advantages, mask, lam, ref_logprobs=None, clip=0.0):
    """APA's squared-error policy loss. Returns (pg_loss, stats).

    logprobs     (B, T) log pi_theta(a_t|s_t) of the sampled tokens, with grad
    old_logprobs (B, T) log pi_old(a_t|s_t), the sampling policy's log-probs (no grad)
    advantages   (B, T) Adv(s_t, a_t), from GAE on the KL-penalised per-token reward (not whitened)
    mask         (B, T) 1 on response tokens, 0 on padding (or non-negative weights)
    lam          lambda > 0, the KL coefficient; the target policy is pi_anchor exp(Adv/lambda)
    ref_logprobs (B, T) or None. None (default): anchor on pi_old, fixed point exactly pi*. Given: anchor on
                 log pi_init, the paper's literal loss, to be used with a reward without KL penalty. The authors'
                 code also whitens the advantages, which moves this form's fixed point (docs/theory.md, 3d and 3e).
    clip         c > 0: bounded APA, Adv/lambda clipped to [-c, c], so that no target is further than c from
                 its anchor (pi_old by default, and then the fixed point stays pi*: docs/theory.md, section 4).
                 0: the paper's unbounded target
    """
    anchor = old_logprobs if ref_logprobs is None else ref_logprobs  # (B, T) log pi_anchor(a_t|s_t)
    step = advantages / lam if not clip else (advantages / lam).clamp(-clip, clip)  # (B, T) Adv/lambda, bounded
    target = anchor + step                                       # (B, T) log of the target policy
    pg_loss = masked_mean((logprobs - target) ** 2, mask)        # ()     L_APA
    stats = {"approx_kl": approx_kl(logprobs, old_logprobs, mask)}
    if clip:                                                     # share of tokens whose target the bound moved
        stats["clipfrac"] = masked_mean(((advantages / lam).abs() > clip).to(logprobs.dtype), mask).item()
    return pg_loss, stats


def awr_loss(logprobs, old_logprobs, advantages, mask, awr_lam, max_weight=20.0):
    """Advantage-weighted regression, the paper's third algorithm (Peng et al. 2019, arXiv 1910.00177,
    Eq. 7; Zhu et al. 2023, Sec. 4 baselines). Returns (pg_loss, stats).

        L_AWR(theta) = -E_{(s,a) ~ pi_old} [ min(exp(Adv(s,a)/lambda'), max_weight) * log pi_theta(a|s) ]

    Weighted maximum likelihood on the policy's own samples. With the per-token KL-penalised reward (as here,
    the reward of PPO and the default APA) its fixed point is pi* for any lambda', which sets the size of a step
    (in a bandit, full steps to each batch's minimiser reach pi* only for lambda' > lambda/2; small steps reach it
    at any lambda'); with the score alone it collapses onto the best response (docs/theory.md, section 5). lambda'
    is a temperature of its own (the authors' HH config uses 0.5), and the weights are clipped at max_weight, as
    in Peng et al.

    logprobs     (B, T) log pi_theta(a_t|s_t) of the sampled tokens, with grad
    old_logprobs (B, T) log pi_old(a_t|s_t), only for the logged approx_kl
    advantages   (B, T) Adv(s_t, a_t), from GAE on the KL-penalised per-token reward (not whitened)
    mask         (B, T) 1 on response tokens, 0 on padding (or non-negative weights)
    awr_lam      lambda' > 0, the temperature of the weights
    max_weight   clip for exp(Adv/lambda')
    """
    weights = torch.exp(advantages / awr_lam).clamp(max=max_weight)     # (B, T) w = exp(Adv/lambda'), clipped
    pg_loss = -masked_mean(weights.detach() * logprobs, mask)           # ()     L_AWR
    clipfrac = masked_mean((weights == max_weight).float(), mask).item()  # share of clipped weights
    return pg_loss, {"approx_kl": approx_kl(logprobs, old_logprobs, mask), "clipfrac": clipfrac}
