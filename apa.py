"""
The APA loss: Advantage-Induced Policy Alignment (Zhu et al. 2023, arXiv 2306.02231, Sec. 3), and
beside it AWR, the paper's other advantage-weighted baseline (`awr_loss`, explained there).

APA regresses the policy's log-probability onto a target policy built from the advantage:

    L_APA(theta) = E_{(s,a) ~ pi_old} [ ( log pi_theta(a|s) - log pi_anchor(a|s) - Adv(s,a)/lambda )^2 ]

The paper anchors on the initial policy (pi_anchor = pi_init), with Adv computed from the reward-model
score alone. This file defaults to anchoring on the sampling policy (pi_anchor = pi_old), with Adv
computed from the per-token KL-penalised reward r_t = -lambda log(pi_old/pi_init)(a_t|s_t) + [t=T] R
(`ppo.kl_penalized_rewards` with kl_coef = lambda). Why:

1. With a softmax policy and on-policy samples, the loss's gradient vanishes iff the residual
   log pi_theta - target is constant over actions at every state; a constant is harmless, so the
   normaliser Z(s) that the paper neglects never matters.
2. Default (pi_old anchor, KL in the reward): at pi_theta = pi_old the residual is -Adv/lambda, so
   the fixed point has Adv = 0 everywhere. That is the soft Bellman equation, so the fixed point is
   exactly the KL-regularised optimum pi*(y|x) = pi_init(y|x) exp(R(x,y)/lambda) / Z(x). Equivalently
   the target is log pi_init + (Adv + lambda log(pi_old/pi_init)(a))/lambda: the paper's form with the
   current token's KL added back to the advantage.
3. Paper's literal form (pass `ref_logprobs`, and use a reward with no KL term, kl_coef = 0): the fixed
   point is pi(a|s) ~ pi_init(a|s) exp(Adv(s,a)/lambda), which ignores the KL that later tokens will
   pay. For one-token responses (a bandit) it is pi*; for longer responses it is not.
4. Do not mix them (pi_init anchor with a KL-penalised reward): the current token's KL is counted
   twice, and in a bandit the fixed point is pi* for 2*lambda instead of lambda.
5. Do not whiten APA's advantages: rescaling Adv rescales the effective lambda.
6. Bounded APA (`clip` = c > 0, not in the paper): the target is anchor + clip(Adv/lambda, -c, c). A batch from
   mu asks no sampled log-probability to move more than c from pi_old: at pi = mu its loss is at most c^2, so
   any pi with no larger loss on the batch (its minimiser among them) has E_mu[log(pi/mu)^2] <= 4 c^2, however
   large the advantages (a step of Adam need not lower the loss; the bound is on the target). With the default anchor
   the fixed point is still exactly pi*: on-policy the gradient vanishes iff clip(Adv(s, .)/lambda, -c, c) is
   constant over actions at every state; since E_pi[Adv(s, .)] = 0 and pi has full support, Adv cannot be
   >= c lambda (or <= -c lambda) at every action, so the constant lies inside (-c, c), where the clip is the
   identity: Adv = 0, as before. With the pi_init anchor (the paper's form) the bound clips the whole distance
   to pi_init and does move the fixed point: use it with the default anchor.
test_losses.py checks each of these numerically.
"""
import torch

from ppo import approx_kl, masked_mean


def apa_loss(logprobs, old_logprobs, advantages, mask, lam, ref_logprobs=None, clip=0.0):
    """APA's squared-error policy loss. Returns (pg_loss, stats).

    logprobs     (B, T) log pi_theta(a_t|s_t) of the sampled tokens, with grad
    old_logprobs (B, T) log pi_old(a_t|s_t), the sampling policy's log-probs (no grad)
    advantages   (B, T) Adv(s_t, a_t), from GAE on the KL-penalised per-token reward (not whitened)
    mask         (B, T) 1 on response tokens, 0 on padding (or non-negative weights)
    lam          lambda > 0, the KL coefficient; the target policy is pi_anchor exp(Adv/lambda)
    ref_logprobs (B, T) or None. None (default): anchor on pi_old, fixed point exactly pi* (see the
                 module docstring, point 2). Given: anchor on log pi_init, the paper's literal loss,
                 to be used with a reward without KL penalty (point 3).
    clip         c > 0: bounded APA, Adv/lambda clipped to [-c, c] (point 6); 0: the paper's unbounded target
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

    Weighted maximum likelihood on the policy's own samples. For a fixed batch from mu = pi_old, the
    minimiser over all policies is pi(a|s) ~ mu(a|s) exp(Adv(s,a)/lambda'): one full step of AWR
    tilts the sampling policy by its advantages. On-policy and with gradient steps, the gradient
    w.r.t. the logits at pi_theta = pi_old is -pi(b) (w(b) - E_pi[w]), zero iff the weight, hence Adv,
    is constant over actions: the stationary points have Adv = 0 everywhere, whatever lambda'.
    1. With the per-token KL-penalised reward (as here, the same reward as PPO and exact APA), Adv = 0
       is the soft Bellman equation, so the fixed point is pi*, for any lambda'. lambda' only sets the
       step: in a bandit, full steps give log pi_{k+1} = (1 - lambda/lambda') log pi_k + (lambda/lambda')
       log pi* + const, which lands on pi* in one step at lambda' = lambda and contracts iff
       lambda' > lambda/2.
    2. With the reward-model score alone (no KL in the reward), Adv = 0 holds only where the policy
       is deterministic on the best responses: the iteration pi_k ~ pi_init exp(k R/lambda') drifts to
       argmax R, mode collapse with unbounded KL to pi_init.
    Where this departs from the paper and from AWR: lambda' (awr_lam) is a temperature of its own,
    not APA's lambda (the authors' HH config uses 0.5); the reward carries the KL penalty (point 1),
    while the authors run AWR inside APA's trainer with no KL in the reward; weights are clipped at
    max_weight as in Peng et al. (20), which bounds a step but moves the minimiser of one batch where
    exp(Adv/lambda') > max_weight (the on-policy fixed point, Adv = 0, has weights 1 and is unchanged).

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
