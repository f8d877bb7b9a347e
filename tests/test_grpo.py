"""
GRPO, Dr. GRPO and RLOO against theory (docs/theory.md, sections 7 and 8, derives each fixed point). As in
test_losses.py, expectations are exact: every k-tuple of responses that a group can draw is k consecutive rows of
the batch, weighted by the tuple's probability, so a masked mean is the large-batch limit of the loss.
Run: pytest -q tests/test_grpo.py   (about a minute of one CPU core)
"""
import functools
import itertools
import statistics

import pytest
import torch

from grpo import KL_ESTIMATORS, group_advantages, grpo_loss, k1, k2, k3, k3_is, rloo_advantages
from ppo import masked_mean, ppo_policy_loss
from test_losses import (PREFIXES, SEQS, STATES, T_, bandit, exact_values, float64, objective, optimum,  # noqa: F401
                         paper_form_fixed_point, seq_probs, token_logprobs, token_mdp, token_optimum, tv)


@functools.cache
def all_tuples(n, k):
    return torch.tensor(list(itertools.product(range(n), repeat=k)))            # (n^k, k) every k-tuple of n


def group_batch(probs, k):
    """Every k-tuple of N responses drawn with probs (N,), as k consecutive rows: (rows (N^k k,), weights (N^k k,))."""
    tuples = all_tuples(len(probs), k)                                           # (N^k, k)
    return tuples.flatten(), probs[tuples].prod(1).repeat_interleave(k)          # each row weighs its tuple's prob


def slow_first_advantages(scores, k, std):
    """GRPO's advantage of the first member of each group, by a Python loop: scores (M,), groups of k rows."""
    out = []
    for g in range(0, len(scores), k):
        group = scores[g:g + k].tolist()
        centred = group[0] - statistics.mean(group)
        out.append(centred / (statistics.stdev(group) + 1e-4) if std else centred)
    return torch.tensor(out)                                                     # (M / k,)


def grpo_adv(R, k, std):
    return lambda rows, old, ref, lam: group_advantages(R[rows], k, std)         # the score alone


def rloo_adv(R, k):
    return lambda rows, old, ref, lam: rloo_advantages(R[rows] - lam * (old - ref).sum(1), k)  # R - lambda KL(y)


def grpo_surrogate(logp, old, ref, adv, w, lam):
    return grpo_loss(logp, old, ref, adv, w, lam)[0]


def rloo_surrogate(logp, old, ref, adv, w, lam):
    return ppo_policy_loss(logp, old, adv, w)[0]


def group_iterate(logits, log_init_fn, advantage_fn, loss_fn, k, lam, iters, epochs=1, lr=0.5, decay=1.0):
    """On-policy training as train.py runs it, with exact group expectations: each iteration enumerates
    the k-tuples under pi_old, takes the group advantages, and makes `epochs` gradient steps (learning rate
    lr * decay^iteration). log_init_fn(logits) -> (N, T) log-probs of every response's tokens; the same under
    pi_init."""
    logits = logits.clone().requires_grad_()
    opt = torch.optim.SGD([logits], lr=lr)
    for it in range(iters):
        opt.param_groups[0]["lr"] = lr * decay ** it
        old_all = log_init_fn(logits).detach()                   # (N, T) log pi_old
        rows, w = group_batch(old_all.sum(1).exp(), k)           # (M,), (M,)
        old, ref = old_all[rows], log_init_fn(None)[rows]        # (M, T)
        adv = advantage_fn(rows, old, ref, lam)[:, None].expand_as(old)  # (M, T) the response's on every token
        for _ in range(epochs):
            loss = loss_fn(log_init_fn(logits)[rows], old, ref, adv, w[:, None].expand_as(old), lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()


# ----------------------------------------------------------------------------------------------
# the advantages and the k3 term against slow versions

def test_group_advantages_match_a_python_loop():
    scores = torch.randn(12, generator=torch.Generator().manual_seed(0))
    for k in (2, 3, 4):
        for std in (True, False):
            slow = []
            for g in range(0, 12, k):
                group = scores[g:g + k].tolist()
                mean, sd = statistics.mean(group), statistics.stdev(group)
                slow += [(x - mean) / (sd + 1e-4) if std else x - mean for x in group]
            torch.testing.assert_close(group_advantages(scores, k, std), torch.tensor(slow), rtol=1e-12, atol=1e-12)
        loo = [x - statistics.mean(scores[g:g + k].tolist()[:i] + scores[g:g + k].tolist()[i + 1:])
               for g in range(0, 12, k) for i, x in enumerate(scores[g:g + k].tolist())]
        torch.testing.assert_close(rloo_advantages(scores, k), torch.tensor(loo), rtol=1e-12, atol=1e-12)


def test_kl_estimators_expected_gradients_on_the_policys_own_samples():
    # at pi_theta = pi_old, every action a row: E_pi[grad k1] = 0; E_pi[grad k2] = E_pi[grad k3_is] =
    # grad KL(pi || pi_init), the reverse KL that J carries; E_pi[grad k3] = grad KL(pi_init || pi), the forward KL.
    # As values: k1 and k3 are unbiased estimates of KL(pi || pi_init), k2 is not.
    log_init, _ = bandit()
    logits = (log_init + torch.randn(len(log_init), generator=torch.Generator().manual_seed(3))).requires_grad_()
    logp = torch.log_softmax(logits, 0)                           # (K,)
    old, w = logp.detach()[:, None], logp.detach().exp()[:, None]  # (K, 1) sampled from pi itself
    def expected(estimator):
        return masked_mean(estimator(logp[:, None], log_init[:, None], old), w)
    def gradient(f):
        return torch.autograd.grad(f, logits, retain_graph=True)[0]
    pi, init = torch.softmax(logits, 0), log_init.exp()
    forward = gradient((init * (log_init - logp)).sum())          # grad KL(pi_init || pi)
    reverse = gradient((pi * (logp - log_init)).sum())            # grad KL(pi || pi_init)
    assert gradient(expected(k1)).abs().max().item() < 1e-15
    torch.testing.assert_close(gradient(expected(k2)), reverse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient(expected(k3_is)), reverse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient(expected(k3)), forward, rtol=1e-10, atol=1e-12)
    assert (forward - reverse).abs().max().item() > 1e-2
    kl = (pi * (logp - log_init)).sum().item()
    assert expected(k1).item() == pytest.approx(kl, rel=1e-12) and expected(k3).item() == pytest.approx(kl, rel=1e-12)
    assert abs(expected(k2).item() - kl) > 1e-2
    assert k3(logp, log_init).min().item() >= 0                   # k3 is never negative


def test_grpo_loss_logs_its_kl_term_under_the_estimators_name():
    """The KL term of GRPO's loss is logged under the name of the estimator that --kl chose (k1, k2, k3, k3_is), as
    the value that the loss adds lambda times: the metrics of a k1 run are k1's, not labelled k3."""
    g = torch.Generator().manual_seed(0)
    logp, old, ref, adv = (torch.randn(3, 5, generator=g) for _ in range(4))   # (B, T)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0]])  # (B, T)
    for name, estimator in KL_ESTIMATORS.items():
        loss, stats = grpo_loss(logp, old, ref, adv, mask, 0.5, 0.2, estimator)
        kl = masked_mean(estimator(logp, ref, old), mask)
        assert set(stats) & set(KL_ESTIMATORS) == {name} and stats[name] == pytest.approx(kl.item(), rel=1e-6)
        assert loss.item() == pytest.approx(ppo_policy_loss(logp, old, adv, mask, 0.2)[0].item() + 0.5 * kl.item(),
                                            rel=1e-6)


# ----------------------------------------------------------------------------------------------
# bandit: K actions, groups of k = 4 (1,296 tuples), the k of experiments/compare.py's runs

KB = 4


def bandit_log_probs(log_init):
    return lambda logits: (log_init if logits is None else torch.log_softmax(logits, 0))[:, None]  # (K, 1)


def bandit_run(R, advantage_fn, loss_fn, lam, steps=3000, lr=0.5):
    log_init, _ = bandit()
    logits = group_iterate(log_init, bandit_log_probs(log_init), advantage_fn, loss_fn, KB, lam, steps, lr=lr)
    return torch.softmax(logits, 0)


def kl_to_init(pi):
    """KL(pi || pi_init) in the bandit, in nats."""
    return (pi * (pi.log() - bandit()[0])).sum().item()


def test_bandit_rloo_converges_to_optimum_where_every_advantage_is_zero():
    log_init, R = bandit()
    lam = 0.5
    pi = bandit_run(R, rloo_adv(R, KB), rloo_surrogate, lam)
    pi_star = optimum(log_init, R, lam)
    assert (pi - pi_star).abs().max().item() <= 1e-6
    rows, _ = group_batch(pi_star, KB)                               # at pi*, R - lambda log(pi*/pi_init) = lambda log Z
    log_star = pi_star.log()[rows, None]                             # for every response: every advantage is 0
    assert rloo_adv(R, KB)(rows, log_star, log_init[rows, None], lam).abs().max().item() < 1e-12
    assert (optimum(log_init, R, lam) - log_init.exp()).abs().max().item() > 0.1  # far from the start


def self_inclusive_adv(R, k):
    """RLOO's reward R - lambda KL(y), but a baseline that includes the response itself: the group's mean."""
    def adv(rows, old, ref, lam):
        groups = (R[rows] - lam * (old - ref).sum(1)).view(-1, k)   # (M/k, k)
        return (groups - groups.mean(1, keepdim=True)).flatten()     # (M,)
    return adv


def test_bandit_rloo_gradient_is_grad_j_and_what_matters_is_the_kl_in_its_reward():
    # on-policy, E[A_i grad log pi(y_i)] with R' = R - lambda log(pi/pi_init) is grad J for the leave-one-out
    # baseline, and (1 - 1/k) grad J for a baseline that includes the response itself: a smaller step, the same
    # zero. Both reach pi*; what puts RLOO there is the KL inside R', not the leave-one-out baseline.
    log_init, R = bandit()
    lam = 0.5
    logits = (log_init + torch.randn(len(R), generator=torch.Generator().manual_seed(5))).requires_grad_()
    old_all = torch.log_softmax(logits, 0).detach()[:, None]         # (K, 1) pi_old = pi_theta
    rows, w = group_batch(old_all[:, 0].exp(), KB)                   # (M,)
    old, ref = old_all[rows], log_init[rows, None]                   # (M, 1)
    def gradient(advantage_fn):
        adv = advantage_fn(rows, old, ref, lam)[:, None]             # (M, 1)
        logp = torch.log_softmax(logits, 0)[rows, None]              # (M, 1)
        return torch.autograd.grad(rloo_surrogate(logp, old, ref, adv, w[:, None], lam), logits)[0]
    J = lambda l: (torch.softmax(l, 0) * (R - lam * (torch.log_softmax(l, 0) - log_init))).sum()  # noqa: E731
    (grad_J,) = torch.autograd.grad(J(logits), logits)
    torch.testing.assert_close(-gradient(rloo_adv(R, KB)), grad_J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(-gradient(self_inclusive_adv(R, KB)), (1 - 1 / KB) * grad_J, rtol=1e-10, atol=1e-12)
    assert grad_J.abs().max() > 1e-2
    pi = bandit_run(R, self_inclusive_adv(R, KB), rloo_surrogate, lam)
    assert (pi - optimum(log_init, R, lam)).abs().max().item() <= 1e-6


def dr_grpo_tilt(log_init, R, lam, k):
    """The policy pi with pi (1 - (1 - 1/k)(R - E_pi[R]) / lambda) = pi_init, Dr. GRPO's fixed point in the bandit:
    pi(y) = pi_init(y) / (1 - c (R(y) - m)) sums to 1 for one m (the sum falls from infinity to 0 as m grows), found
    by bisection; then m = E_pi[R]."""
    c, p0 = (1 - 1 / k) / lam, log_init.exp()
    lo, hi = R.max().item() - 1 / c, R.max().item() + 10
    for _ in range(200):
        m = (lo + hi) / 2
        lo, hi = (m, hi) if (p0 / (1 - c * (R - m))).sum() > 1 else (lo, m)
    return p0 / (1 - c * (R - m))


def test_bandit_dr_grpo_fixed_point_is_a_hyperbolic_tilt_not_pi_star():
    # pi(y) (1 - (1 - 1/k)(R(y) - E_pi[R]) / lambda) = pi_init(y): agrees with pi* for lambda k/(k-1) to first order
    # only. And no law says on which side of pi* it lies: at k = 4 its KL to pi_init is 0.17 nats against pi*'s 0.09
    # at lambda = 0.5 (past pi*), 3.49 against 4.13 at 0.05 (short of it). The iteration reaches the formula at both.
    log_init, R = bandit()
    lam = 0.5
    pi = bandit_run(R, grpo_adv(R, KB, std=False), grpo_surrogate, lam)
    c = (1 - 1 / KB) / lam
    torch.testing.assert_close(pi * (1 - c * (R - (pi * R).sum())), log_init.exp(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pi, dr_grpo_tilt(log_init, R, lam, KB), rtol=0, atol=1e-6)
    for lam_pi_star in (lam, lam * KB / (KB - 1)):
        assert (pi - optimum(log_init, R, lam_pi_star)).abs().max().item() > 1e-2
    pi_small = bandit_run(R, grpo_adv(R, KB, std=False), grpo_surrogate, 0.05, steps=1000, lr=4.0)  # lambda = 0.05
    torch.testing.assert_close(pi_small, dr_grpo_tilt(log_init, R, 0.05, KB), rtol=0, atol=1e-6)
    assert (kl_to_init(pi), kl_to_init(optimum(log_init, R, lam))) == pytest.approx((0.17, 0.09), abs=5e-3)  # past
    assert (kl_to_init(pi_small), kl_to_init(optimum(log_init, R, 0.05))) == pytest.approx((3.49, 4.13), abs=5e-3)


def slow_expected_grpo_advantage(pi, R, k):
    """w(y) = E[A_1 | y_1 = y] for GRPO (std), by a Python loop over every k-tuple."""
    w, p = [0.0] * len(R), [0.0] * len(R)
    for t in itertools.product(range(len(R)), repeat=k):
        prob = 1.0
        for y in t:
            prob *= pi[y].item()
        scores = [R[y].item() for y in t]
        a1 = (scores[0] - statistics.mean(scores)) / (statistics.stdev(scores) + 1e-4)
        w[t[0]] += prob * a1
        p[t[0]] += prob
    return torch.tensor([wi / pi_i for wi, pi_i in zip(w, p)])


def test_bandit_grpo_fixed_point_lies_past_pi_star_at_one_lambda_and_short_of_it_at_another():
    # GRPO's hyperbolic tilt pi(y) (1 - w(y)/lambda) = pi_init(y), reached by iteration at lambda = 0.1 and 0.05
    # (k = 4): its KL to pi_init is 3.71 nats against pi*'s 3.01 at 0.1 (past pi*), 3.96 against 4.13 at 0.05 (short)
    log_init, R = bandit()
    for lam, kls in ((0.1, (3.71, 3.01)), (0.05, (3.96, 4.13))):
        pi = bandit_run(R, grpo_adv(R, KB, std=True), grpo_surrogate, lam, steps=1000, lr=4.0)
        w = slow_expected_grpo_advantage(pi, R, KB)
        torch.testing.assert_close(pi * (1 - w / lam), log_init.exp(), rtol=0, atol=1e-4)
        assert (kl_to_init(pi), kl_to_init(optimum(log_init, R, lam))) == pytest.approx(kls, abs=5e-3)


def test_bandit_grpo_fixed_point_ignores_the_scale_of_the_reward():
    # GRPO divides by the group's std: pi(y) (1 - w(y)/lambda) = pi_init(y) with w scale-free, so R and 3R
    # train to the same policy (up to the 1e-4 in the std), while pi* moves
    log_init, R = bandit()
    lam = 0.5
    pi = bandit_run(R, grpo_adv(R, KB, std=True), grpo_surrogate, lam)
    w = slow_expected_grpo_advantage(pi, R, KB)                       # E_pi[w] = 0: a group's advantages sum to 0
    torch.testing.assert_close(pi * (1 - w / lam), log_init.exp(), rtol=0, atol=1e-7)
    pi3 = bandit_run(3 * R, grpo_adv(3 * R, KB, std=True), grpo_surrogate, lam)
    assert (pi3 - pi).abs().max().item() < 1e-3
    assert (optimum(log_init, 3 * R, lam) - optimum(log_init, R, lam)).abs().max().item() > 0.1
    assert (pi - optimum(log_init, R, lam)).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------------------------
# token MDP of test_losses.py: 27 responses of 3 tokens, groups of k = 2 (729 tuples)

KT = 2


def token_log_probs(init_logits):
    return lambda logits: token_logprobs(init_logits if logits is None else logits)  # (27, 3)


def token_run(R, advantage_fn, loss_fn, lam, iters=300, lr=2.0):
    init_logits, _ = token_mdp()
    return group_iterate(init_logits, token_log_probs(init_logits), advantage_fn, loss_fn, KT, lam, iters,
                         epochs=10, lr=lr)


def test_token_mdp_rloo_converges_to_optimum():
    init_logits, R = token_mdp()
    lam = 0.5
    logits = token_run(R, rloo_adv(R, KT), rloo_surrogate, lam, iters=600)  # the masked mean halves its step: k = 2 rows
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    assert tv(logits, token_optimum(init_logits, R, lam)) <= 1e-3
    assert abs(objective(logits, init_logits, R, lam).item() - J_star) <= 1e-5


def test_token_mdp_dr_grpo_fixed_point_is_the_per_state_tilt_by_the_score_advantage():
    # at every state: pi(a|s) (1 - (1 - 1/k)(Q_R(s,a) - V_R(s)) / lambda) = pi_init(a|s), Q and V of the score
    # alone (no KL of later tokens): not pi*
    init_logits, R = token_mdp()
    lam = 0.5
    logits = token_run(R, grpo_adv(R, KT, std=False), grpo_surrogate, lam, lr=6.0)
    logp = token_logprobs(logits)                                     # (27, 3)
    score = torch.zeros(len(SEQS), T_)
    score[:, -1] = R                                                  # (27, 3) the score on the last token
    V = exact_values(score, logp.sum(1).exp())                        # (27, 3) V_R(s_t)
    Q = torch.cat([V[:, 1:], R[:, None]], 1)                          # (27, 3) Q_R(s_t, a_t) = V_R(s_{t+1}), R at the end
    c = (1 - 1 / KT) / lam
    torch.testing.assert_close(logp.exp() * (1 - c * (Q - V)), token_logprobs(init_logits).exp(), rtol=0, atol=1e-6)
    J_star = lam * torch.logsumexp(token_logprobs(init_logits).sum(1) + R / lam, 0).item()
    gap = J_star - objective(logits, init_logits, R, lam).item()
    print(f"Dr. GRPO on the token MDP: TV to pi* {tv(logits, token_optimum(init_logits, R, lam)):.4f}, J* - J {gap:.4f}")
    assert gap > 1e-3


def expected_first_advantage(logits, R, k, std):
    """W(s_t, a_t) and W(s_t) (27, 3): E[A_1 | y_1 passes s_t, then a_t] and E[A_1 | y_1 passes s_t], GRPO's
    advantage of the first member of a group, by a Python loop over every group that pi (logits) draws."""
    rows, w = group_batch(seq_probs(logits), k)
    first, p = rows.view(-1, k)[:, 0].tolist(), w.view(-1, k)[:, 0]  # (M/k,) member 1 of each group, the group's prob
    A = slow_first_advantages(R[rows], k, std)                      # (M/k,) its advantage
    seqs = [tuple(y) for y in SEQS.tolist()]
    def W(length):                                                    # (27, 3) E[A_1 | y_1 starts with y[:t + length]]
        out = torch.zeros(len(seqs), T_)
        for i, y in enumerate(seqs):
            for t in range(T_):
                sel = torch.tensor([seqs[j][:t + length] == y[:t + length] for j in first])
                out[i, t] = (p[sel] * A[sel]).sum() / p[sel].sum()
        return out
    return W(1), W(0)


def test_token_mdp_grpo_fixed_point_is_the_per_state_tilt_by_the_expected_group_advantage():
    # at every state: pi(a|s) (1 - (W(s,a) - W(s)) / lambda) = pi_init(a|s), W(s,a) = E[A_1 | y_1 passes s, then a],
    # W(s) = E[A_1 | y_1 passes s], by enumerating the groups of the converged policy
    init_logits, R = token_mdp()
    lam = 0.5
    logits = token_run(R, grpo_adv(R, KT, std=True), grpo_surrogate, lam, iters=450, lr=6.0)
    W_sa, W_s = expected_first_advantage(logits, R, KT, std=True)
    tilt = 1 - (W_sa - W_s) / lam                                     # (27, 3)
    torch.testing.assert_close(token_logprobs(logits).exp() * tilt, token_logprobs(init_logits).exp(), rtol=0, atol=1e-6)
    assert tv(logits, token_optimum(init_logits, R, lam)) > 1e-2


@pytest.mark.parametrize("name", ["rloo", "grpo", "dr_grpo"])
def test_token_mdp_expected_gradient_at_pi_star_is_zero_only_for_rloo(name):
    # the expected gradient on the logits of state s, action b, at pi_theta = pi_old, of GRPO's loss (a token mean
    # over responses of T tokens) is (1/T) P(s) [-pi(b|s) (W(s,b) - W(s)) + lambda (pi(b|s) - pi_init(b|s))]:
    # the group advantage's term and k3's forward-KL term (docs/theory.md, section 7). At pi* it is not 0; RLOO's is.
    init_logits, R = token_mdp()
    lam = 0.5
    log_star = torch.log(token_optimum(init_logits, R, lam))          # (27,) pi*(y), by enumeration
    # pi* as a token policy: pi*(a|s) = pi*(s.a) / pi*(s), from the probabilities of the prefixes
    seqs = [tuple(y) for y in SEQS.tolist()]
    prefix_logp = {y[:t]: torch.logsumexp(log_star[[z[:t] == y[:t] for z in seqs]], 0) for y in seqs for t in range(T_ + 1)}
    star_logits = torch.zeros(len(PREFIXES), 3)
    for p, i in PREFIXES.items():
        star_logits[i] = torch.stack([prefix_logp[p + (a,)] - prefix_logp[p] for a in range(3)])
    assert tv(star_logits, log_star.exp()) < 1e-12
    adv_fn, loss_fn = {"rloo": (rloo_adv(R, KT), rloo_surrogate), "grpo": (grpo_adv(R, KT, True), grpo_surrogate),
                       "dr_grpo": (grpo_adv(R, KT, False), grpo_surrogate)}[name]
    logits = star_logits.clone().requires_grad_()
    old = token_logprobs(logits).detach()
    rows, w = group_batch(old.sum(1).exp(), KT)
    ref = token_logprobs(init_logits)[rows]
    adv = adv_fn(rows, old[rows], ref, lam)[:, None].expand(-1, T_)
    loss_fn(token_logprobs(logits)[rows], old[rows], ref, adv, w[:, None].expand(-1, T_), lam).backward()
    if name == "rloo":
        assert logits.grad.abs().max().item() < 1e-12
        return
    W_sa, W_s = expected_first_advantage(star_logits, R, KT, std=name == "grpo")  # (27, 3)
    pi, pi_init = torch.softmax(star_logits, -1), torch.softmax(init_logits, -1)  # (13, 3) pi(a|s), pi_init(a|s)
    derived = torch.zeros(len(PREFIXES), 3)
    for p, i in PREFIXES.items():
        j, t = next((j, len(p)) for j, y in enumerate(seqs) if y[:len(p)] == p)   # a response through s = p
        W_s_b = torch.stack([W_sa[next(r for r, y in enumerate(seqs) if y[:t + 1] == p + (b,)), t] for b in range(3)])
        derived[i] = prefix_logp[p].exp() / T_ * (-pi[i] * (W_s_b - W_s[j, t]) + lam * (pi[i] - pi_init[i]))
    torch.testing.assert_close(logits.grad, derived, rtol=1e-8, atol=1e-12)
    assert derived.abs().max() > 1e-3                                  # not zero


# ----------------------------------------------------------------------------------------------
# where the KL goes (--kl): in the sequence reward, or in the loss by one of the four estimators.
# docs/theory.md, section 8, derives each fixed point below.

KK = 2                                                                # groups of 2: 36 tuples in the bandit, 729 in the token MDP


def placed_kl_adv(R, algo, in_reward):
    """The group advantage of algo (rloo, dr_grpo, grpo) from R - lambda KL(y) (the KL in the reward) or from R."""
    def adv(rows, old, ref, lam):
        score = R[rows] - lam * (old - ref).sum(1) if in_reward else R[rows]
        return rloo_advantages(score, KK) if algo == "rloo" else group_advantages(score, KK, std=algo == "grpo")
    return adv


def placed_kl_loss(estimator):
    """The loss: the clipped surrogate alone (estimator None: the KL is in the reward), or with lambda times the
    estimator's KL term (grpo_loss)."""
    def loss(logp, old, ref, adv, w, lam):
        if estimator is None:
            return ppo_policy_loss(logp, old, adv, w)[0]
        return grpo_loss(logp, old, ref, adv, w, lam, kl_estimator=estimator)[0]
    return loss


def bandit_claims(log_init, R, lam):
    """The claimed fixed point of each (algorithm, --kl) in the bandit, as a residual of the policy pi (0 at it)."""
    c = 1 - 1 / KK                                                    # Dr. GRPO's mean includes the response itself
    star = lambda l: lambda pi: pi - optimum(log_init, R, l)          # noqa: E731 pi* for temperature l
    exp_tilt = lambda pi: (lambda d: d - d.mean())(pi.log() - log_init - slow_expected_grpo_advantage(pi, R, KK) / lam)  # noqa: E731
    hyperbolic = lambda pi: pi * (1 - (R - (pi * R).sum()) / lam) - log_init.exp()  # noqa: E731 RLOO's c = 1
    return {("rloo", "reward"): star(lam), ("dr_grpo", "reward"): star(lam), ("grpo", "reward"): star(lam),
            ("rloo", "k2"): star(lam), ("rloo", "k3_is"): star(lam), ("dr_grpo", "k2"): star(lam / c),
            ("dr_grpo", "k3_is"): star(lam / c), ("grpo", "k2"): exp_tilt, ("rloo", "k3"): hyperbolic}


@pytest.mark.parametrize("algo,kl", [("rloo", "reward"), ("dr_grpo", "reward"), ("grpo", "reward"), ("rloo", "k2"),
                                     ("rloo", "k3_is"), ("dr_grpo", "k2"), ("dr_grpo", "k3_is"), ("grpo", "k2"),
                                     ("rloo", "k3")])
def test_bandit_fixed_point_of_each_place_for_the_kl(algo, kl):
    # reward: pi* for each (GRPO's steps do not shrink near it, as whitened ones: decaying steps); k2 and k3_is:
    # the reverse KL's gradient, so RLOO reaches pi*, Dr. GRPO pi* for lambda k/(k - 1), GRPO pi_init exp(w/lambda);
    # k3: the forward KL's, the hyperbolic tilt. A wrong estimator or placement misses its formula.
    log_init, R = bandit()
    lam = 0.5
    estimator = {"reward": None, "k2": k2, "k3": k3, "k3_is": k3_is}[kl]
    decaying = (algo, kl) == ("grpo", "reward")
    logits = group_iterate(log_init, bandit_log_probs(log_init), placed_kl_adv(R, algo, kl == "reward"),
                           placed_kl_loss(estimator), KK, lam, 3000 if decaying else 2000, lr=0.5 if decaying else 1.0,
                           decay=0.997 if decaying else 1.0)
    pi = torch.softmax(logits, 0)
    assert bandit_claims(log_init, R, lam)[algo, kl](pi).abs().max().item() < 1e-5
    assert (optimum(log_init, R, lam) - log_init.exp()).abs().max().item() > 0.05  # the start is not the answer


def visits(logits):
    """d(s): the probability that the policy (logits (13, 3)) passes each prefix s. Returns (13,)."""
    pi = seq_probs(logits)[:, None].expand(-1, T_)                    # (27, 3) each response passes one s per t
    return torch.zeros(len(PREFIXES)).index_add(0, STATES.flatten(), pi.flatten())


def per_state_mean(x, logits):
    """E_{a ~ pi(.|s_t)}[x(s_t, a)] on every token (27, 3), for x (27, 3) a function of (s_t, a_t)."""
    table = torch.zeros(len(PREFIXES), 3)
    table[STATES, SEQS] = x                                           # (13, 3) x(s, a): every pair is some token
    return (torch.softmax(logits, -1) * table).sum(1)[STATES]         # (27, 3)


def test_token_mdp_kl_estimators_expected_gradients_act_per_state_weighted_by_the_policys_visits():
    # at pi_theta = pi_old, every response a row weighted by pi(y): the expected gradient of the token mean of k3 is
    # (1/T) sum_s d(s) grad KL(pi_init(.|s) || pi(.|s)), with d(s) the probability that pi visits s, held fixed; of k2
    # and k3_is, the same with KL(pi(.|s) || pi_init(.|s)); of k1, 0. Neither is the gradient of a sequence-level KL:
    # the forward KL(pi_init || pi) weights the states by pi_init's visits, and the reverse KL(pi || pi_init) also
    # moves the visits themselves (the KL that the later tokens pay).
    init_logits, _ = token_mdp()
    logits = (init_logits + torch.randn(init_logits.shape, generator=torch.Generator().manual_seed(7))).requires_grad_()
    logp, ref = token_logprobs(logits), token_logprobs(init_logits)  # (27, 3)
    old, w = logp.detach(), logp.detach().sum(1).exp()[:, None].expand(-1, T_)  # (27, 3) sampled from pi itself
    def gradient(f):
        return torch.autograd.grad(f, logits, retain_graph=True)[0]
    def expected(estimator):
        return gradient(masked_mean(estimator(logp, ref, old), w))
    d = visits(logits.detach())                                       # (13,)
    log_pi, log_init = torch.log_softmax(logits, -1), torch.log_softmax(init_logits, -1)  # (13, 3)
    forward = gradient((d * (log_init.exp() * (log_init - log_pi)).sum(1)).sum()) / T_
    reverse = gradient((d * (log_pi.exp() * (log_pi - log_init)).sum(1)).sum()) / T_
    torch.testing.assert_close(expected(k3), forward, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected(k2), reverse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected(k3_is), reverse, rtol=1e-10, atol=1e-12)
    assert expected(k1).abs().max() < 1e-15
    seq, seq_init = logp.sum(1), ref.sum(1)                           # (27,) log pi(y), log pi_init(y)
    seq_forward = gradient((seq_init.exp() * (seq_init - seq)).sum()) / T_   # grad KL(pi_init || pi) / T
    seq_reverse = gradient((seq.exp() * (seq - seq_init)).sum()) / T_        # grad KL(pi || pi_init) / T
    assert (forward - seq_forward).abs().max() > 1e-2 and (reverse - seq_reverse).abs().max() > 1e-2


def test_token_mdp_k1_in_the_loss_pulls_nowhere_and_the_policy_turns_deterministic():
    # k1's expected gradient at pi_theta = pi_old is 0: with one step per batch, RLOO with k1 in the loss takes the
    # steps of RLOO with no KL at all. Within an update the term is not constant: on pi_old's samples, lambda times the
    # token mean of k1 is (lambda/T) (KL(pi_old || pi_init) - sum_s d(s) KL(pi_old(.|s) || pi_theta(.|s))), with d the
    # visits of pi_old, so minimising it pushes pi_theta away from pi_old (at second order), never towards pi_init.
    # Trained, each algorithm turns near-deterministic on a high-scoring response, which need not be the best, and
    # its KL to pi_init nears -log pi_init(y) of that response.
    init_logits, R = token_mdp()
    lam = 0.5
    runs = {est: group_iterate(init_logits, token_log_probs(init_logits), placed_kl_adv(R, "rloo", False),
                               placed_kl_loss(est), KK, lam, 100, epochs=1, lr=6.0) for est in (k1, None)}
    torch.testing.assert_close(runs[k1], runs[None], rtol=0, atol=1e-12)
    assert tv(runs[k1], seq_probs(init_logits)) > 0.5                  # it did move
    old_logits = runs[k1]                                             # a pi_old, and a pi_theta moved away from it
    theta = old_logits + 0.3 * torch.randn(old_logits.shape, generator=torch.Generator().manual_seed(8))
    old = token_logprobs(old_logits)                                  # (27, 3)
    rows, w = group_batch(old.sum(1).exp(), KK)                      # every group pi_old draws
    ref = token_logprobs(init_logits)[rows]
    loss, _ = grpo_loss(token_logprobs(theta)[rows], old[rows], ref, torch.zeros_like(ref), w[:, None].expand_as(ref),
                        lam, kl_estimator=k1)                         # no advantages: the k1 term alone
    log_old, log_theta = torch.log_softmax(old_logits, -1), torch.log_softmax(theta, -1)  # (13, 3)
    kl_steps = (visits(old_logits) * (log_old.exp() * (log_old - log_theta)).sum(1)).sum()  # sum_s d KL(old || theta)
    kl_init = (old.sum(1).exp() * (old - token_logprobs(init_logits)).sum(1)).sum()  # KL(pi_old || pi_init)
    assert loss.item() == pytest.approx(lam / T_ * (kl_init - kl_steps).item(), rel=1e-10)
    assert kl_steps > 1e-2
    log_init, pi_star = token_logprobs(init_logits).sum(1), token_optimum(init_logits, R, lam)  # (27,), (27,)
    kl_star = (pi_star * (pi_star.log() - log_init)).sum().item()     # pi*'s KL to pi_init: 0.43
    for algo in ("rloo", "dr_grpo", "grpo"):                          # 200 iterations of 10 steps per batch
        pi = seq_probs(group_iterate(init_logits, token_log_probs(init_logits), placed_kl_adv(R, algo, False),
                                     placed_kl_loss(k1), KK, lam, 200, epochs=10, lr=6.0))  # (27,)
        y = pi.argmax()
        kl = (pi * (pi.log() - log_init)).sum().item()
        assert pi[y] > 0.99 and R[y] > 0.75 and kl == pytest.approx(-log_init[y].item(), abs=0.1) and kl > 5 * kl_star
        assert (y == R.argmax()) == (algo != "dr_grpo")              # Dr. GRPO: 0.991 on the second best (R 0.80)


def placed_kl_claims(init_logits, R, lam):
    """The claimed fixed point of each (algorithm, --kl) in the token MDP, as a residual of the trained policy
    (logits (13, 3)) on every token (27, 3), 0 at the fixed point. Q_R(s, a) and V_R(s) are the score's alone under
    the policy itself; c = 1 - 1/k for Dr. GRPO."""
    c = 1 - 1 / KK
    log_init = token_logprobs(init_logits)                            # (27, 3)
    def exp_tilt(temperature):                                        # pi_init exp(Q_R / temperature) per state
        claimed = token_logprobs(paper_form_fixed_point(init_logits, R, temperature)).exp()  # backward induction
        return lambda logits: token_logprobs(logits).exp() - claimed
    def grpo_exp_tilt(logits):                                        # u - E_pi[u | s] = (W(s, a) - W(s)) / lambda
        u = token_logprobs(logits) - log_init
        W_sa, W_s = expected_first_advantage(logits, R, KK, std=True)
        return u - per_state_mean(u, logits) - (W_sa - W_s) / lam
    def hyperbolic(logits):                                           # pi (1 - (Q_R - V_R) / lambda) = pi_init
        score = torch.zeros(len(SEQS), T_)
        score[:, -1] = R
        V = exact_values(score, seq_probs(logits))                    # (27, 3) V_R(s_t)
        Q = torch.cat([V[:, 1:], R[:, None]], 1)                      # (27, 3) Q_R(s_t, a_t)
        return token_logprobs(logits).exp() * (1 - (Q - V) / lam) - log_init.exp()
    def star(logits):                                                 # pi*, on the sequences
        return seq_probs(logits) - token_optimum(init_logits, R, lam)
    return {("grpo", "reward"): star, ("rloo", "k2"): exp_tilt(lam), ("dr_grpo", "k2"): exp_tilt(lam / c),
            ("grpo", "k2"): grpo_exp_tilt, ("rloo", "k3"): hyperbolic}


@pytest.mark.parametrize("algo,kl", [("grpo", "reward"), ("rloo", "k2"), ("dr_grpo", "k2"), ("grpo", "k2"),
                                     ("rloo", "k3")])
def test_token_mdp_fixed_point_of_each_place_for_the_kl(algo, kl):
    # docs/theory.md, section 8, on responses of 3 tokens. The KL in the reward: GRPO reaches pi* with decaying steps
    # (its steps do not shrink near pi*). k2 in the loss gives the reverse KL's gradient at each state only, so RLOO
    # settles at pi_init exp(Q_R/lambda) per state (the paper's APA's fixed point), Dr. GRPO at pi_init exp(c
    # Q_R/lambda), GRPO at the exponential tilt by W; k3 gives RLOO the hyperbolic tilt. None of these is pi*: the
    # KL of the later tokens is missing. (k3_is has k2's expected gradient at every state, so its fixed points: the
    # test of the estimators' per-state gradients. RLOO's and Dr. GRPO's gradients with the KL in the reward: the
    # test below.)
    init_logits, R = token_mdp()
    lam = 0.5
    estimator = {"reward": None, "k2": k2, "k3": k3}[kl]
    iters, lr, decay = {("grpo", "reward"): (400, 6.0, 0.98), ("rloo", "k2"): (450, 12.0, 1.0),
                        ("rloo", "k3"): (200, 12.0, 1.0), ("dr_grpo", "k2"): (200, 12.0, 1.0),
                        ("grpo", "k2"): (300, 12.0, 1.0)}[algo, kl]   # as many steps as each needs
    logits = group_iterate(init_logits, token_log_probs(init_logits), placed_kl_adv(R, algo, kl == "reward"),
                           placed_kl_loss(estimator), KK, lam, iters, epochs=10, lr=lr, decay=decay)
    residual = placed_kl_claims(init_logits, R, lam)[algo, kl](logits).abs().max().item()
    assert residual < (1e-3 if kl == "reward" else 5e-5)
    assert (tv(logits, token_optimum(init_logits, R, lam)) < 1e-3) == (kl == "reward")


def test_token_mdp_gradient_with_the_kl_in_the_reward_is_grad_j_for_rloo_and_c_grad_j_for_dr_grpo():
    # at pi_theta = pi_old, with R' = R - lambda log(pi_old/pi_init)(y) in the reward: RLOO's surrogate has the
    # gradient -grad J / T, Dr. GRPO's -(1 - 1/k) grad J / T (its group mean includes the response itself), GRPO's
    # neither (its std). Both vanish only where grad J does, at pi*; for responses of several tokens too.
    init_logits, R = token_mdp()
    lam = 0.5
    logits = (init_logits + torch.randn(init_logits.shape, generator=torch.Generator().manual_seed(9))).requires_grad_()
    old = token_logprobs(logits).detach()                             # (27, 3)
    rows, w = group_batch(old.sum(1).exp(), KK)
    ref = token_logprobs(init_logits)[rows]
    (grad_J,) = torch.autograd.grad(objective(logits, init_logits, R, lam), logits)
    def gradient(algo):
        adv = placed_kl_adv(R, algo, True)(rows, old[rows], ref, lam)[:, None].expand(-1, T_)  # (M, 3)
        loss = placed_kl_loss(None)(token_logprobs(logits)[rows], old[rows], ref, adv, w[:, None].expand(-1, T_), lam)
        return torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(-T_ * gradient("rloo"), grad_J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(-T_ * gradient("dr_grpo"), (1 - 1 / KK) * grad_J, rtol=1e-10, atol=1e-12)
    assert (T_ * gradient("grpo") + grad_J).abs().max() > 1e-2 and grad_J.abs().max() > 1e-2
