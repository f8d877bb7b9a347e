"""
Tests of the losses against theory: fixed points against the closed-form KL-regularised optimum
pi* = pi_init exp(R/lambda) / Z, gradients against exact policy gradients, and GAE against a plain
Python loop. Expectations are exact: instead of sampling, every action (bandit) or every sequence
(token MDP) is a row of the batch and the mask holds its probability, so a masked mean is an
expectation. Run: pytest -q test_losses.py   (about 30 s of one CPU core)
"""
import itertools
import math

import pytest
import torch

from apa import apa_loss, awr_loss
from ppo import gae, kl_penalized_rewards, masked_mean, masked_whiten, ppo_policy_loss, value_loss



@pytest.fixture(autouse=True)
def float64():
    """Exact expectations deserve exact arithmetic (restored after each test, for other test files)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


# ----------------------------------------------------------------------------------------------
# bandit: one state, K actions (responses of one token)

K = 6


def bandit():
    g = torch.Generator().manual_seed(0)
    log_init = torch.log_softmax(torch.randn(K, generator=g), 0)  # (K,) log pi_init
    R = torch.rand(K, generator=g) * 2 - 1                         # (K,) rewards in [-1, 1]
    return log_init, R


def optimum(log_init, R, lam):
    return torch.softmax(log_init + R / lam, 0)                    # pi* ~ pi_init exp(R / lambda)


def bandit_iterate(log_init, R, kl_coef, policy_loss, steps=3000, lr=0.5, decay=1.0):
    """Gradient descent on softmax logits with an on-policy loss, as train.py runs it (pi_old = pi_theta before
    each step); every action is a row (K, 1) of the batch weighted by pi_old(a). Rewards
    R - kl_coef log(pi_old/pi_init), Adv = r - E_pi[r]. policy_loss(logp, old, adv, w) -> the loss.
    Step t has the learning rate lr * decay^t."""
    logits = log_init.clone().requires_grad_()
    opt = torch.optim.SGD([logits], lr=lr)
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr * decay ** t
        logp = torch.log_softmax(logits, 0)[:, None]               # (K, 1)
        old = logp.detach()                                         # (K, 1) pi_old = pi_theta, no grad
        w = old.exp()                                               # (K, 1) sampling weights pi_old(a)
        r = kl_penalized_rewards(R, old, log_init[:, None], w, kl_coef)  # (K, 1)
        adv = r - masked_mean(r, w)                                 # (K, 1) Adv = r - V, V = E_pi[r]
        loss = policy_loss(logp, old, adv, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)


def bandit_fixed_point(log_init, R, lam, kl_coef, anchor_init, transform=None, steps=3000, lr=0.5, decay=1.0):
    """Where on-policy APA settles in the bandit (bandit_iterate with apa_loss); transform(adv, w) -> the advantages
    the loss sees (None: as they are)."""
    ref = log_init[:, None] if anchor_init else None
    def loss(logp, old, adv, w):
        adv = transform(adv, w) if transform else adv
        return apa_loss(logp, old, adv, w, lam, ref_logprobs=ref)[0]
    return bandit_iterate(log_init, R, kl_coef, loss, steps, lr, decay)


def test_bandit_soft_advantage_loss_is_zero_exactly_at_optimum():
    log_init, R = bandit()
    lam = 0.5
    pi_star = optimum(log_init, R, lam)
    adv = R - lam * torch.logsumexp(log_init + R / lam, 0)         # soft advantage R - lambda log Z
    mu = torch.distributions.Dirichlet(torch.ones(K)).sample()      # any full-support, off-policy sampler
    def loss_at(logp):
        return apa_loss(logp[:, None], logp[:, None], adv[:, None], mu[:, None], lam, ref_logprobs=log_init[:, None])[0]
    assert loss_at(pi_star.log()).item() < 1e-20
    for scale in (1e-2, 0.3):
        logits = pi_star.log() + scale * torch.randn(K)
        assert loss_at(torch.log_softmax(logits, 0)).item() > 1e-3 * scale ** 2


@pytest.mark.parametrize("kl_coef, anchor_init", [(0.0, True), (0.5, False)], ids=["paper", "default"])
def test_bandit_on_policy_apa_converges_to_optimum(kl_coef, anchor_init):
    # paper's form (pi_init anchor, no KL in reward) and ours (pi_old anchor, KL in reward) agree on a bandit
    log_init, R = bandit()
    lam = 0.5
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=kl_coef, anchor_init=anchor_init)
    assert (pi - optimum(log_init, R, lam)).abs().max().item() <= 1e-4


def test_bandit_mixed_form_counts_kl_twice():
    # KL-penalised reward AND pi_init anchor: the fixed point is pi* for 2 lambda, not lambda
    log_init, R = bandit()
    lam = 0.5
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=lam, anchor_init=True)
    assert (pi - optimum(log_init, R, 2 * lam)).abs().max().item() <= 1e-4
    assert (pi - optimum(log_init, R, lam)).abs().max().item() > 1e-2


def bandit_apa_gradient(logits, log_init, R, lam, transform):
    """The gradient on the logits of the default APA loss at pi_theta = pi_old (the expected one: every action a row)."""
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, 0)[:, None]                   # (K, 1)
    old, w = logp.detach(), logp.detach().exp()                     # (K, 1), (K, 1)
    r = kl_penalized_rewards(R, old, log_init[:, None], w, lam)     # (K, 1)
    adv = transform(r - masked_mean(r, w), w)                       # (K, 1)
    return torch.autograd.grad(apa_loss(logp, old, adv, w, lam)[0], logits)[0], adv


def test_bandit_whitened_advantages_keep_the_default_fixed_point_and_only_rescale_the_step():
    # the default anchor: at pi_theta = pi_old the whitened loss's gradient is the plain one divided by the batch's
    # std, so it vanishes where the plain one does, at pi*. The steps no longer shrink as the advantages do near pi*:
    # at a constant learning rate the iteration does not settle (here it ends in a cycle of period 2 around pi*);
    # with decaying steps it reaches pi*.
    log_init, R = bandit()
    lam = 0.5
    logits = log_init + torch.randn(K, generator=torch.Generator().manual_seed(4))  # some pi_old, not pi*
    plain, adv = bandit_apa_gradient(logits, log_init, R, lam, lambda a, w: a)
    whitened, _ = bandit_apa_gradient(logits, log_init, R, lam, masked_whiten)
    std = masked_mean(adv ** 2, torch.softmax(logits, 0)[:, None]).add(1e-8).sqrt()  # E_pi[Adv] = 0: its std
    torch.testing.assert_close(whitened, plain / std, rtol=1e-10, atol=1e-12)
    assert (std - 1).abs() > 0.1                                    # a real rescaling
    pi_star = optimum(log_init, R, lam)
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=lam, anchor_init=False, transform=masked_whiten, decay=0.997)
    assert (pi - pi_star).abs().max().item() <= 1e-6
    even, odd = (bandit_fixed_point(log_init, R, lam, kl_coef=lam, anchor_init=False, transform=masked_whiten,
                                    steps=n) for n in (500, 501))     # constant steps
    torch.testing.assert_close(even, bandit_fixed_point(log_init, R, lam, kl_coef=lam, anchor_init=False,
                                                        transform=masked_whiten, steps=498), rtol=0, atol=1e-9)
    tv_even, tv_odd = (0.5 * (p - pi_star).abs().sum().item() for p in (even, odd))   # total variation from pi*
    assert tv_even == pytest.approx(0.104, abs=1e-3) and tv_odd == pytest.approx(0.170, abs=1e-3)  # a 2-cycle


def test_bandit_scaled_advantages_move_only_the_paper_forms_fixed_point():
    # Adv x 2: the default anchor still reaches pi*, the pi_init anchor (the paper's form) pi* for lambda / 2.
    # Whitened, the paper's form (as the authors' code runs it) reaches pi* for std x lambda, with std the
    # standard deviation of the score under that fixed point itself.
    log_init, R = bandit()
    lam = 0.5
    double = lambda adv, w: 2 * adv                                  # noqa: E731
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=lam, anchor_init=False, transform=double)
    assert (pi - optimum(log_init, R, lam)).abs().max().item() <= 1e-6
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=0.0, anchor_init=True, transform=double)
    assert (pi - optimum(log_init, R, lam / 2)).abs().max().item() <= 1e-6
    assert (pi - optimum(log_init, R, lam)).abs().max().item() > 1e-2
    lam = 2.0
    pi = bandit_fixed_point(log_init, R, lam, kl_coef=0.0, anchor_init=True, transform=masked_whiten, decay=0.997)
    std = (pi * (R - (pi * R).sum()) ** 2).sum().add(1e-8).sqrt()   # masked_whiten's std at the fixed point
    assert (pi - optimum(log_init, R, std * lam)).abs().max().item() <= 1e-5
    assert (pi - optimum(log_init, R, lam)).abs().max().item() > 1e-2 and std < 0.5   # measured: std 0.233


def test_bounded_apa_batch_minimiser_stays_within_2c_of_the_sampler():
    # one batch from mu: at pi = mu the loss is E_mu[clip(Adv/lambda)^2] <= c^2, so wherever descent from mu ends,
    # E_mu[log(pi/mu)^2] <= 4 c^2, whatever the advantages; unbounded, the distance grows with Adv/lambda
    log_init, R = bandit()
    lam, c = 0.05, 0.3
    mu = torch.softmax(log_init, 0)
    adv = R - (mu * R).sum()
    def minimise(clip):
        logits = mu.log().clone().requires_grad_()
        opt = torch.optim.Adam([logits], lr=0.05)
        def loss_at(z):
            logp = torch.log_softmax(z, 0)[:, None]
            return apa_loss(logp, mu.log()[:, None], adv[:, None], mu[:, None], lam, clip=clip)[0]
        for _ in range(2000):
            loss = loss_at(logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.autograd.grad(loss_at(logits), logits)[0].abs().max() < 1e-6  # the batch's minimiser, reached
        return (mu * (torch.log_softmax(logits.detach(), 0) - mu.log()) ** 2).sum().sqrt().item()  # rms log-ratio
    assert minimise(c) <= 2 * c                                      # measured: 0.303
    assert minimise(0.0) == pytest.approx(2.01, abs=0.01)            # unbounded: far past 2c = 0.6
    assert (adv / lam).abs().max() > 10 * c
    # the unbounded minimiser is not the tilt mu exp(Adv/lambda) / Z: off-policy the target's normaliser matters
    tilt = torch.log_softmax(mu.log() + adv / lam, 0).requires_grad_()
    assert (mu * (tilt - mu.log()) ** 2).sum().sqrt().item() == pytest.approx(10.17, abs=0.01)
    loss = apa_loss(torch.log_softmax(tilt, 0)[:, None], mu.log()[:, None], adv[:, None], mu[:, None], lam)[0]
    assert torch.autograd.grad(loss, tilt)[0].abs().max() > 1.0


def test_bounded_apa_target_moves_each_log_prob_by_the_clipped_advantage():
    # the clip itself: at pi = mu the bounded loss is E_mu[clip(Adv/lambda, -c, c)^2], and its gradient on the
    # logits is -2 mu(b) (clip(b) - E_mu[clip]) (docs/theory.md, section 2, with the residual -clip); the logged
    # clipfrac is the share of targets the bound moved, |Adv/lambda| > c
    log_init, R = bandit()
    lam, c = 0.5, 0.22
    mu = torch.softmax(log_init, 0)
    adv = R - (mu * R).sum()
    clipped = (adv / lam).clamp(-c, c)                               # (K,)
    assert ((adv / lam).abs() < c).any() and (adv / lam > c).any() and (adv / lam < -c).any()  # inside and both sides
    logits = mu.log().clone().requires_grad_()
    loss, stats = apa_loss(torch.log_softmax(logits, 0)[:, None], mu.log()[:, None], adv[:, None], mu[:, None], lam,
                           clip=c)
    assert loss.item() == pytest.approx((mu * clipped ** 2).sum().item(), rel=1e-12)
    assert stats["clipfrac"] == pytest.approx((mu * ((adv / lam).abs() > c)).sum().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, -2 * mu * (clipped - (mu * clipped).sum()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kl_coef, anchor_init", [(0.0, True), (0.5, False)], ids=["paper", "default"])
def test_bandit_bounded_apa_converges_to_optimum_with_the_default_anchor_only(kl_coef, anchor_init):
    # pi_old anchor: the fixed point is pi* still; pi_init anchor (the paper's form): the bound clips the whole
    # distance to pi_init, log pi - log pi_init = clip(Adv/lambda) + const, and pi* is out of its reach
    log_init, R = bandit()
    lam, c = 0.5, 0.2
    ref = log_init[:, None] if anchor_init else None
    pi = bandit_iterate(log_init, R, kl_coef, lambda logp, old, adv, w: apa_loss(logp, old, adv, w, lam, ref, clip=c)[0])
    gap = (pi - optimum(log_init, R, lam)).abs().max().item()
    assert gap > 1e-2 if anchor_init else gap <= 1e-4
    assert (R - (log_init.exp() * R).sum()).abs().max() / lam > 5 * c  # the bound is active at the start


# ----------------------------------------------------------------------------------------------
# token MDP: vocabulary 3, responses of exactly 3 tokens, tabular softmax policy over all 13 prefixes

V_, T_ = 3, 3
SEQS = torch.tensor(list(itertools.product(range(V_), repeat=T_)))  # (27, 3) every response y
PREFIXES = {p: i for i, p in enumerate(p for t in range(T_) for p in itertools.product(range(V_), repeat=t))}
STATES = torch.tensor([[PREFIXES[tuple(y[:t])] for t in range(T_)] for y in SEQS.tolist()])  # (27, 3)
ONES = torch.ones(len(SEQS), T_, dtype=torch.float64)                                  # (27, 3) no padding


def token_mdp():
    g = torch.Generator().manual_seed(1)
    init_logits = torch.randn(len(PREFIXES), V_, generator=g)       # (13, 3) pi_init
    R = torch.rand(len(SEQS), generator=g) * 2 - 1                  # (27,) terminal rewards in [-1, 1]
    return init_logits, R


def token_logprobs(logits):
    return torch.log_softmax(logits, -1)[STATES, SEQS]              # (27, 3) log pi(a_t|s_t) on every row


def seq_probs(logits):
    return token_logprobs(logits).sum(1).exp()                      # (27,) pi(y)


def objective(logits, init_logits, R, lam):
    """J(pi) = E_pi[R] - lambda KL(pi || pi_init), exactly, at the sequence level."""
    logp, logp_init = token_logprobs(logits).sum(1), token_logprobs(init_logits).sum(1)  # (27,)
    return (logp.exp() * (R - lam * (logp - logp_init))).sum()


def exact_values(rewards, weights):
    """V^pi(s_t): the expected reward-to-go from each state, by enumeration. rewards (27, 3); weights (27,) pi(y)."""
    to_go = rewards.flip(1).cumsum(1).flip(1)                       # (27, 3) sum_{t' >= t} r_t'
    num = torch.zeros(len(PREFIXES)).index_add(0, STATES.flatten(), (weights[:, None] * to_go).flatten())
    den = torch.zeros(len(PREFIXES)).index_add(0, STATES.flatten(), weights[:, None].expand(-1, T_).flatten())
    return (num / den)[STATES]                                      # (27, 3)


def rollout(logits, init_logits, R, kl_coef):
    """What train.py does on a batch, with every sequence in it weighted by its probability."""
    old = token_logprobs(logits).detach()                           # (27, 3) log pi_old
    ref = token_logprobs(init_logits)                               # (27, 3) log pi_init
    w = old.sum(1).exp()[:, None].expand(-1, T_)                    # (27, 3) pi_old(y) on every token
    rewards = kl_penalized_rewards(R, old, ref, ONES, kl_coef)      # (27, 3)
    values = exact_values(rewards, w[:, 0])                         # (27, 3) exact V^{pi_old}
    advantages, _ = gae(rewards, values, ONES, gamma=1.0, gae_lambda=0.95)  # (27, 3) E[A | s, a] = Q - V exactly
    return old, ref, w, advantages


def iterate(loss_fn, init_logits, R, kl_coef, iters, epochs=10, lr=2.0, decay=1.0, start=None):
    """On-policy training as train.py runs it, with exact expectations: each iteration a rollout of every response
    under pi_old, then `epochs` gradient steps on it, at the learning rate lr * decay^iteration. Starts at pi_init,
    or at the logits `start`."""
    logits = (init_logits if start is None else start).clone().requires_grad_()
    opt = torch.optim.SGD([logits], lr=lr)
    for it in range(iters):
        opt.param_groups[0]["lr"] = lr * decay ** it
        old, ref, w, adv = rollout(logits, init_logits, R, kl_coef)
        for _ in range(epochs):
            loss = loss_fn(token_logprobs(logits), old, ref, adv, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()


def tv(logits, pi_star):
    return 0.5 * (seq_probs(logits) - pi_star).abs().sum().item()


def token_optimum(init_logits, R, lam):
    return torch.softmax(token_logprobs(init_logits).sum(1) + R / lam, 0)  # (27,) pi*(y) by enumeration


def token_optimum_logits(init_logits, R, lam):
    """pi* as a token policy, by the soft Bellman equation backward over the prefixes: at every state
    pi*(a|s) = pi_init(a|s) exp((V*(s.a) - V*(s)) / lambda), V* = R at the end. Returns its logits (13, 3)."""
    logits, values = torch.zeros(len(PREFIXES), V_), {tuple(y): r for y, r in zip(SEQS.tolist(), R)}
    for t in reversed(range(T_)):
        for p in (p for p in PREFIXES if len(p) == t):
            V_next = torch.stack([values[p + (a,)] for a in range(V_)])  # (3,) V*(p.a)
            tilted = torch.log_softmax(init_logits[PREFIXES[p]], 0) + V_next / lam  # (3,)
            logits[PREFIXES[p]] = torch.log_softmax(tilted, 0)    # (3,) log pi*(.|p)
            values[p] = lam * torch.logsumexp(tilted, 0)          # V*(p)
    return logits


def apa_default(logp, old, ref, adv, w, lam=0.5, clip=0.0):
    return apa_loss(logp, old, adv, w, lam, clip=clip)[0]


def apa_paper(logp, old, ref, adv, w, lam=0.5):
    return apa_loss(logp, old, adv, w, lam, ref_logprobs=ref)[0]


def test_token_mdp_apa_converges_to_optimum():
    init_logits, R = token_mdp()
    lam = 0.5
    logits = iterate(apa_default, init_logits, R, kl_coef=lam, iters=300)
    pi_star = token_optimum(init_logits, R, lam)
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    assert tv(logits, pi_star) <= 1e-3
    assert abs(objective(logits, init_logits, R, lam).item() - J_star) <= 1e-5
    assert tv(init_logits, pi_star) > 0.1  # the test starts far from the answer


def test_token_mdp_bounded_apa_converges_to_optimum():
    # Adv/lambda clipped to [-c, c]: stationary iff the clipped value is constant over actions, which with
    # E_pi[Adv] = 0 means Adv = 0: the fixed point is pi* still (apa.py, point 6)
    init_logits, R = token_mdp()
    lam, c = 0.5, 0.2
    logits = iterate(lambda *a: apa_default(*a[:4], a[4], clip=c), init_logits, R, kl_coef=lam, iters=300)
    pi_star = token_optimum(init_logits, R, lam)
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    assert tv(logits, pi_star) <= 1e-3
    assert abs(objective(logits, init_logits, R, lam).item() - J_star) <= 1e-5
    _, _, _, adv = rollout(init_logits, init_logits, R, lam)
    assert (adv / lam).abs().max() > 5 * c                           # the bound is active at the start


def paper_form_fixed_point(init_logits, R, lam):
    """The claimed fixed point of the paper's form, by backward induction over the prefixes: at every state
    pi(a|s) ~ pi_init(a|s) exp(Q_R(s, a)/lambda), where Q_R(s, a) = E_pi[R | s, a] is the score's alone under pi
    itself (R at the last token). Returns its logits (13, 3)."""
    logits, values = torch.zeros(len(PREFIXES), V_), {}            # values: V_R of each full response and prefix
    values.update({tuple(y): r for y, r in zip(SEQS.tolist(), R)})
    for t in reversed(range(T_)):
        for p in (p for p in PREFIXES if len(p) == t):
            Q = torch.stack([values[p + (a,)] for a in range(V_)])  # (3,) Q_R(p, a)
            logits[PREFIXES[p]] = torch.log_softmax(init_logits[PREFIXES[p]] + Q / lam, 0)
            values[p] = (logits[PREFIXES[p]].exp() * Q).sum()      # V_R(p) under pi
    return logits


def test_token_mdp_paper_form_misses_optimum():
    # no KL in the reward, pi_init anchor: the fixed point is pi(a|s) ~ pi_init(a|s) exp(Q_R(s, a)/lambda) at every
    # state, Q_R of the score alone under pi itself. It ignores the KL that later tokens pay: it is not pi*.
    init_logits, R = token_mdp()
    lam = 0.5
    logits = iterate(apa_paper, init_logits, R, kl_coef=0.0, iters=300)
    claimed, pi_star = paper_form_fixed_point(init_logits, R, lam), token_optimum(init_logits, R, lam)
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    gap = J_star - objective(logits, init_logits, R, lam).item()
    print(f"paper's literal APA on the token MDP: TV to pi* {tv(logits, pi_star):.4f}, J* - J {gap:.4f}, "
          f"TV to the claimed fixed point {tv(logits, seq_probs(claimed)):.2e}")
    assert tv(logits, seq_probs(claimed)) < 1e-4
    assert tv(claimed, pi_star) > 0.1 and gap > 1e-2                  # not pi* (measured: TV 0.119, gap 0.028)


def apa_authors(logp, old, ref, adv, w, lam):
    """The authors' configuration: the paper's form with the batch's advantages whitened (no KL in the reward)."""
    return apa_loss(logp, old, masked_whiten(adv, w), w, lam, ref_logprobs=ref)[0]


def whitened_std(logits, init_logits, R):
    """The std that masked_whiten divides by: of the advantages of the score alone over every token of the batch that
    the policy samples (gamma 1, GAE lambda 0.95, exact values)."""
    _, _, w, adv = rollout(logits, init_logits, R, kl_coef=0.0)
    return masked_mean((adv - masked_mean(adv, w)) ** 2, w).add(1e-8).sqrt().item()


def test_token_mdp_authors_configuration_is_the_paper_forms_fixed_point_for_s_lambda_or_collapses():
    # pi_init anchor, no KL in the reward, advantages whitened over the batch: at every state
    # pi(a|s) ~ pi_init(a|s) exp(Q_R(s, a) / (s lambda)), the paper form's fixed point at the temperature s lambda, with
    # s the std of the batch's advantages under that policy itself (sigma in docs/theory.md, section 3e). Where
    # s = std has no solution s > 0, the policy collapses onto the best response.
    init_logits, R = token_mdp()
    lam = 2.0
    logits = iterate(lambda *a: apa_authors(*a, lam=lam), init_logits, R, kl_coef=0.0, iters=300)
    s = whitened_std(logits, init_logits, R)
    assert s == pytest.approx(0.447, abs=1e-3)                        # measured: 0.4472, against 0.482 under pi_init
    assert tv(logits, seq_probs(paper_form_fixed_point(init_logits, R, s * lam))) < 1e-5   # measured: 1e-7
    wrong = [seq_probs(paper_form_fixed_point(init_logits, R, lam)), token_optimum(init_logits, R, s * lam),
             token_optimum(init_logits, R, lam)]                        # lambda for s lambda; pi* for the tilt
    assert min(tv(logits, pi) for pi in wrong) > 0.04                  # measured: 0.148, 0.050, 0.154
    for lam in (0.5, 1.0):                                             # s = std(s) has no solution s > 0 here
        assert all(whitened_std(paper_form_fixed_point(init_logits, R, s * lam), init_logits, R) < s
                   for s in torch.linspace(0.01, 1.0, 100).tolist())
        logits = iterate(lambda *a: apa_authors(*a, lam=lam), init_logits, R, kl_coef=0.0, iters=100)
        p = seq_probs(logits)
        assert p.max() > 0.999 and p.argmax() == R.argmax() and whitened_std(logits, init_logits, R) < 0.01


# ----------------------------------------------------------------------------------------------
# AWR: -E_mu[exp(Adv/lambda') log pi]. One batch's minimiser is mu exp(Adv/lambda')/Z; iterated
# on-policy with the KL-penalised reward it reaches pi* for any lambda'; without KL it collapses.

INF = float("inf")  # no weight clipping: the theory below is about the unclipped loss


def awr_grad(logits, mu, adv, awr_lam, max_weight=INF):
    """Gradient w.r.t. the logits of the AWR loss on a fixed bandit batch (every action a row, weight mu)."""
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, 0)[:, None]                   # (K, 1)
    loss, _ = awr_loss(logp, logp.detach(), adv[:, None], mu[:, None], awr_lam, max_weight)
    return torch.autograd.grad(loss, logits)[0]


def awr_full_step(mu, adv, awr_lam, steps=4000):
    """Minimise the AWR loss of one batch sampled from mu, by gradient descent on softmax logits (convex;
    its curvature is at most E_mu[w], hence the step size)."""
    logits, lr = mu.log().clone(), 1 / (mu * torch.exp(adv / awr_lam)).sum()
    for _ in range(steps):
        logits -= lr * awr_grad(logits, mu, adv, awr_lam)
    return torch.log_softmax(logits, 0)


def bandit_kl_advantages(log_pi, log_init, R, lam):
    """Adv of each action under the KL-penalised reward R - lambda log(pi/pi_init), V = E_pi[r]."""
    w = log_pi.exp()[:, None]                                       # (K, 1)
    r = kl_penalized_rewards(R, log_pi[:, None], log_init[:, None], w, lam)  # (K, 1)
    return (r - masked_mean(r, w))[:, 0]                            # (K,)


def test_awr_batch_minimiser_is_sampler_tilted_by_exp_advantage():
    log_init, R = bandit()
    with torch.random.fork_rng():                                   # any sampler, the same whatever ran before
        torch.manual_seed(0)                                        # (1 draw in 70 leaves the clip below inactive)
        mu = torch.distributions.Dirichlet(torch.ones(K)).sample()
    adv = R - (mu * R).sum()
    for awr_lam in (0.3, 2.0):
        tilted = torch.log_softmax(mu.log() + adv / awr_lam, 0)    # claimed minimiser mu exp(Adv/lambda')/Z
        assert awr_grad(tilted, mu, adv, awr_lam).abs().max().item() < 1e-12
        for wrong in (mu.log() - adv / awr_lam, mu.log() + adv * awr_lam, mu.log() + adv):
            assert awr_grad(wrong, mu, adv, awr_lam).abs().max().item() > 1e-3
    # clipped weights: the minimiser is mu min(exp(Adv/lambda'), max_weight)/Z
    clipped = torch.log_softmax(mu.log() + (adv / 0.3).clamp(max=math.log(2.0)), 0)
    assert awr_grad(clipped, mu, adv, 0.3, max_weight=2.0).abs().max().item() < 1e-12
    assert (adv / 0.3).max() > math.log(2.0)                        # the clip is active


def test_bandit_awr_full_steps_contract_to_optimum_by_one_minus_lam_over_awr_lam():
    # log pi_{k+1} = (1 - lambda/lambda') log pi_k + (lambda/lambda') log pi* + const: one step at
    # lambda' = lambda, halving at lambda' = 2 lambda, oscillating growth (factor -1.5) at lambda' = 0.4 lambda
    log_init, R = bandit()
    lam = 0.5
    log_star = optimum(log_init, R, lam).log()
    log_pi = torch.log_softmax(log_star + torch.randn(K, generator=torch.Generator().manual_seed(2)), 0)  # pi_old != pi*
    def err(lp):
        d = lp - log_star
        return d - d.mean()                                          # log pi - log pi*, up to a constant
    for awr_lam in (lam, 2 * lam, 0.4 * lam):
        nxt = awr_full_step(log_pi.exp(), bandit_kl_advantages(log_pi, log_init, R, lam), awr_lam)
        torch.testing.assert_close(err(nxt), (1 - lam / awr_lam) * err(log_pi), atol=1e-8, rtol=1e-6)
    assert err(log_pi).abs().max() > 0.5


def bandit_awr_iterate(log_init, R, lam, kl_coef, awr_lam, steps=3000, lr=0.5):
    """On-policy AWR with gradient steps (bandit_iterate with awr_loss, weights unclipped)."""
    return bandit_iterate(log_init, R, kl_coef, lambda logp, old, adv, w: awr_loss(logp, old, adv, w, awr_lam, INF)[0],
                          steps, lr)


@pytest.mark.parametrize("awr_lam", [0.1, 0.5, 2.0])
def test_bandit_awr_converges_to_optimum_with_kl_reward_and_collapses_without(awr_lam):
    # lambda' != lambda, on both sides: the fixed point is pi* for every lambda', and small gradient steps reach it,
    # also at lambda' = 0.1 < lambda / 2, where full steps diverge (the contraction test); without the KL: greedy
    log_init, R = bandit()
    lam = 0.3
    pi = bandit_awr_iterate(log_init, R, lam, kl_coef=lam, awr_lam=awr_lam, lr=2 * awr_lam, steps=1500)  # ~ lambda'
    assert (pi - optimum(log_init, R, lam)).abs().max().item() <= 1e-6
    pi = bandit_awr_iterate(log_init, R, lam, kl_coef=0.0, awr_lam=awr_lam, lr=2 * awr_lam, steps=1500)  # greedy
    assert pi[R.argmax()].item() > 0.99


def awr_on_tokens(logp, old, ref, adv, w, awr_lam=0.5):
    return awr_loss(logp, old, adv, w, awr_lam, INF)[0]


def test_token_mdp_awr_converges_to_optimum_with_kl_reward():
    init_logits, R = token_mdp()
    lam = 0.3                                                       # lambda' = 0.5 in awr_on_tokens
    logits = iterate(awr_on_tokens, init_logits, R, kl_coef=lam, iters=300, lr=6.0)
    pi_star = token_optimum(init_logits, R, lam)
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    assert tv(logits, pi_star) <= 1e-3
    assert abs(objective(logits, init_logits, R, lam).item() - J_star) <= 1e-5


def test_token_mdp_awr_without_kl_collapses_on_best_response():
    init_logits, R = token_mdp()
    logits = iterate(awr_on_tokens, init_logits, R, kl_coef=0.0, iters=300)
    pi = seq_probs(logits)
    print(f"AWR without KL on the token MDP: pi(best response) {pi[R.argmax()].item():.4f}")
    assert pi[R.argmax()].item() > 0.99


# ----------------------------------------------------------------------------------------------
# PPO

def ppo_surrogate(logp, old, ref, adv, w):
    return ppo_policy_loss(logp, old, adv, w, clip_eps=0.2)[0]


def test_ppo_gradient_at_old_policy_is_exact_policy_gradient():
    init_logits, R = token_mdp()
    lam = 0.5
    logits = (init_logits + 0.5 * torch.randn(init_logits.shape)).requires_grad_()  # some pi_old != pi_init
    old, ref, w, adv = rollout(logits, init_logits, R, kl_coef=lam)
    (grad_surrogate,) = torch.autograd.grad(ppo_surrogate(token_logprobs(logits), old, ref, adv, w), logits)
    (grad_J,) = torch.autograd.grad(objective(logits, init_logits, R, lam), logits)
    # masked_mean averages over the T_ tokens of a response, hence the factor
    torch.testing.assert_close(-T_ * grad_surrogate, grad_J, rtol=1e-8, atol=1e-10)
    assert grad_J.abs().max().item() > 1e-2


def test_ppo_iterations_approach_optimum():
    init_logits, R = token_mdp()
    lam = 0.5
    logits = iterate(ppo_surrogate, init_logits, R, kl_coef=lam, iters=300)
    pi_star = token_optimum(init_logits, R, lam)
    assert tv(logits, pi_star) <= 1e-3                              # measured: 4.7e-4


def ppo_whitened(logp, old, ref, adv, w):
    """PPO's loss as train.py runs it: the clipped surrogate on the advantages whitened over the batch's tokens
    (train.py passes mean_fn=global_mean, the mean over every process; in one process that is masked_mean)."""
    return ppo_surrogate(logp, old, ref, masked_whiten(adv, w), w)


def test_ppo_with_whitened_advantages_steps_by_grad_j_over_t_std_and_stops_only_at_optimum():
    # At pi_theta = pi_old the whitened surrogate's gradient is -grad J / (T s), with s the standard deviation of the
    # batch's advantages over its tokens (E[A] = 0 with exact values): zero only where grad J is, at pi*, where every
    # advantage is 0. Near pi*, s shrinks with the advantages and the steps do not: at a constant learning rate the
    # iteration circles pi* without settling; with a decaying one it reaches pi*.
    init_logits, R = token_mdp()
    lam = 0.5
    g = torch.Generator().manual_seed(6)
    logits = (init_logits + 0.5 * torch.randn(init_logits.shape, generator=g)).requires_grad_()  # some pi_old
    old, ref, w, adv = rollout(logits, init_logits, R, kl_coef=lam)
    (grad_surrogate,) = torch.autograd.grad(ppo_whitened(token_logprobs(logits), old, ref, adv, w), logits)
    (grad_J,) = torch.autograd.grad(objective(logits, init_logits, R, lam), logits)
    std = (masked_mean((adv - masked_mean(adv, w)) ** 2, w) + 1e-8).sqrt()  # masked_whiten's s
    torch.testing.assert_close(-T_ * std * grad_surrogate, grad_J, rtol=1e-8, atol=1e-10)
    assert (std - 1).abs() > 0.1 and grad_J.abs().max() > 1e-2      # a real rescaling, a real gradient
    star = token_optimum_logits(init_logits, R, lam).requires_grad_()  # at pi*: every advantage is 0, so is the step
    assert tv(star.detach(), token_optimum(init_logits, R, lam)) < 1e-12
    old, ref, w, adv = rollout(star, init_logits, R, kl_coef=lam)
    assert adv.abs().max() < 1e-12
    assert torch.autograd.grad(ppo_whitened(token_logprobs(star), old, ref, adv, w), star)[0].abs().max() < 1e-9
    pi_star = token_optimum(init_logits, R, lam)
    logits = iterate(ppo_whitened, init_logits, R, kl_coef=lam, iters=300, decay=0.98)  # decaying steps
    assert tv(logits, pi_star) <= 1e-3                              # measured: 7.9e-4
    logits = iterate(ppo_whitened, init_logits, R, kl_coef=lam, iters=250)  # constant steps (lr 2, 10 epochs)
    tvs = []
    for _ in range(50):
        logits = iterate(ppo_whitened, init_logits, R, kl_coef=lam, iters=1, start=logits)
        tvs.append(tv(logits, pi_star))
    assert min(tvs) > 0.03                                          # measured: 0.059 to 0.122 over iterations 251-300


def test_ppo_clipping_zeroes_gradient_outside_range():
    eps = 0.2
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 0.9]]))  # (1, 6)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]])                  # (1, 6)
    logp = torch.zeros(1, 6, requires_grad=True)
    loss, stats = ppo_policy_loss(logp, logp.detach() - log_ratio, adv, torch.ones(1, 6), clip_eps=eps)
    loss.backward()
    grad = logp.grad[0]
    assert grad[:2].abs().max().item() == 0.0               # ratio past the clip in the advantage's direction
    assert (grad[2:].abs() > 1e-3).all()                    # moving back towards the range, or inside it
    assert stats["clipfrac"] == pytest.approx(2 / 6)


def test_value_loss_clips_around_old_values():
    # old values != 0, so that a clip around 0 (or around the returns) would give other numbers: V_old = 0.3,
    # 0.3, -0.5; V = 0.45 moves 0.15 (inside the range), 0.7 and 0.1 move 0.4 and 0.6 (past it: clipped to 0.5, 0.1)
    returns = torch.tensor([[1.0, 1.0, -1.0]])                    # (1, 3)
    old_values = torch.tensor([[0.3, 0.3, -0.5]])
    values = torch.tensor([[0.45, 0.7, 0.1]], requires_grad=True)
    loss, stats = value_loss(values, old_values, returns, torch.ones(1, 3), clip_eps=0.2)
    loss.backward()
    # max((V - R)^2, (clip(V) - R)^2): 0.55^2; max(0.3^2, 0.5^2) = 0.5^2, clipped; max(1.1^2, 0.8^2) = 1.1^2, not
    assert loss.item() == pytest.approx(0.5 * (0.55 ** 2 + 0.5 ** 2 + 1.1 ** 2) / 3)
    torch.testing.assert_close(values.grad[0], torch.tensor([-0.55, 0.0, 1.1]) / 3)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# GAE, rewards, masks, whitening

def padded_batch(B=5, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T                                                     # one row without padding
    mask = (torch.arange(T)[None] < lengths[:, None]).double()       # (B, T)
    return g, lengths, mask


def test_gae_matches_python_loop():
    g, lengths, mask = padded_batch()
    B, T = mask.shape
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(lengths[b])
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        a = 0.0
        for t in reversed(range(n)):
            a = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * a
            assert advantages[b, t].item() == pytest.approx(a, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(a + v[t], abs=1e-12)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_kl_penalized_rewards_put_score_on_last_real_token():
    g, lengths, mask = padded_batch()
    B, T = mask.shape
    logprobs, ref_logprobs, scores = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g), torch.randn(B, generator=g)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.3)
    for b in range(B):
        n = int(lengths[b])
        expected = -0.3 * (logprobs[b, :n] - ref_logprobs[b, :n])
        expected[n - 1] += scores[b]
        torch.testing.assert_close(rewards[b, :n], expected)
        assert (rewards[b, n:] == 0).all()


def test_padded_tokens_change_nothing():
    g, lengths, mask = padded_batch()
    B, T = mask.shape
    tensors = [torch.randn(B, T, generator=g) for _ in range(6)]
    garbage = [torch.where(mask > 0, x, 30 * torch.randn(B, T, generator=g)) for x in tensors]  # any finite values
    scores = torch.randn(B, generator=g)

    def everything(logprobs, old_logprobs, ref_logprobs, values, old_values, rewards):
        adv, ret = gae(kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, 0.1) + rewards, values, mask)
        return [adv * mask, ret * mask, masked_whiten(adv, mask),
                apa_loss(logprobs, old_logprobs, adv, mask, 0.1)[0],
                apa_loss(logprobs, old_logprobs, adv, mask, 0.1, ref_logprobs=ref_logprobs)[0],
                ppo_policy_loss(logprobs, old_logprobs, adv, mask)[0],
                value_loss(values, old_values, ret, mask)[0]]

    for clean, dirty in zip(everything(*tensors), everything(*garbage)):
        torch.testing.assert_close(clean, dirty)


def test_whitening_has_zero_mean_unit_std_over_masked_tokens():
    g, lengths, mask = padded_batch()
    x = 3.0 + 5.0 * torch.randn(mask.shape, generator=g)
    w = masked_whiten(x, mask)
    valid = w[mask > 0]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()
    assert math.isclose(masked_mean(x, mask).item(), x[mask > 0].mean().item())
