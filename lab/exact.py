"""
The exact evaluator: E[R], KL(pi || pi_init), J = E[R] - lambda KL, J* and the gap J* - J = lambda KL(pi || pi*)
of a policy, by enumerating every response the sampler can return: no sampling, no estimate. It is feasible
for short responses only (--max_new_tokens=2 on the embedded task: 91,507 responses per prompt). train.py logs
it every exact_every iterations (gap_exact, ...), and the tests use it to prove that training reaches pi*
(docs/exact.md). With a judge (--gold_fn), it also gives the judge's score exactly, and the frontier: the best
score of the judge that any policy reaches at the same KL to pi_init, so that over-optimisation is one number.
"""
import math
import time

import torch

from data import call_reward
from model import autocast, left_pad, lm_forward, status


EXACT_LIMIT = 5_000_000   # the most responses (over all prompts) the exact evaluator enumerates


def n_responses(V, T):
    """How many responses model.generate can return with V tokens and max_new_tokens = T: those ending in
    end-of-text at step t < T (no end-of-text before), plus every sequence of T tokens without one before."""
    return sum((V - 1) ** t for t in range(T - 1)) + (V - 1) ** (T - 1) * V


def prefix_levels(V, T, eot):
    """The prefixes generate may extend at steps 0..T-1, in a fixed order: (N_t, t) tokens with no end-of-text."""
    prefixes, others = torch.zeros(1, 0, dtype=torch.long), torch.tensor([a for a in range(V) if a != eot])
    for _ in range(T):
        yield prefixes
        prefixes = torch.cat([prefixes.repeat_interleave(len(others), 0), others.repeat(len(prefixes))[:, None]], 1)


def all_responses(V, T, eot):
    """Every response generate can return, (n, T) padded with end-of-text, in the order of response_logprobs."""
    out = []
    for t, prefixes in enumerate(prefix_levels(V, T, eot)):
        if t < T - 1:                                                    # end-of-text at step t
            out.append(torch.cat([prefixes, torch.full((len(prefixes), T - t), eot)], 1))
        else:                                                            # any token at the last step
            last = torch.arange(V).repeat(len(prefixes))[:, None]        # (N_t V, 1)
            out.append(torch.cat([prefixes.repeat_interleave(V, 0), last], 1))
    return torch.cat(out)                                                # (n, T)


@torch.no_grad()
def response_logprobs(cfg, lm, prompt_tokens, T, eot, V, chunk=4096):
    """log pi(y|x) (prompts, n) of every response y of all_responses over the tokenizer's V tokens, under the
    causal LM lm: one forward pass per prefix (prompt, prefix, a placeholder whose position predicts the next)."""
    device, out = lm.device, []
    prefix_logp = torch.zeros(len(prompt_tokens), 1, device=device)     # (X, 1) log pi(empty prefix)
    for t, prefixes in enumerate(prefix_levels(V, T, eot)):
        rows = [p + q + [eot] for p in prompt_tokens for q in prefixes.tolist()]  # prompt, prefix, placeholder
        next_logp = []
        for i in range(0, len(rows), chunk):
            ids, mask = left_pad(rows[i:i + chunk], eot, device)         # (b, W)
            with autocast(cfg, device):
                logits, _ = lm_forward(lm, ids, mask, ids.shape[1] - 1, V)  # (b, 1, V) at the placeholder
            next_logp.append(torch.log_softmax(logits[:, 0], -1))        # (b, V)
        logp = prefix_logp[:, :, None] + torch.cat(next_logp).view(len(prompt_tokens), len(prefixes), V)  # (X, N_t, V)
        if t == T - 1:
            out.append(logp.flatten(1))                                  # (X, N_t V) any last token
        else:
            out.append(logp[:, :, eot])                                  # (X, N_t) end-of-text at step t
            prefix_logp = logp[:, :, torch.arange(V, device=device) != eot].flatten(1)  # (X, N_t (V - 1))
    return torch.cat(out, 1).double()                                    # (X, n)


@torch.no_grad()
def response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc, gold_fn=None):
    """What the exact evaluator needs that does not depend on the policy, computed once: the score of every
    response to every prompt and its log-prob under pi_init, both (prompts, n), and the judge's score where there is
    one (gold_fn). None when the responses are more than EXACT_LIMIT in all (then nothing is enumerated)."""
    V, T, eot, t0 = enc.n_vocab, cfg.max_new_tokens, enc.eot_token, time.time()  # generate's V tokens
    if len(prompts) * n_responses(V, T) > EXACT_LIMIT:
        return None
    responses = all_responses(V, T, eot).tolist()                        # (n, T)
    completions = enc.decode_batch([[a for a in r if a != eot] for r in responses])  # as sample() decodes them
    rewards, golds = [], []
    for i, prompt in enumerate(prompts):
        rewards.append(call_reward(cfg, reward_fn, [prompt] * len(completions), completions))  # (n,)
        if gold_fn:
            golds.append(call_reward(cfg, gold_fn, [prompt] * len(completions), completions,
                                     f"gold function {cfg.gold_fn}"))    # (n,)
        status(f"exact evaluation: scoring {len(prompts)} x {len(completions)} responses: {i + 1}/{len(prompts)} | "
               f"{time.time() - t0:.0f}s", done=i + 1 == len(prompts))
    return {"cfg": cfg, "prompt_tokens": prompt_tokens, "max_new_tokens": T, "eot": eot, "V": V,
            "rewards": torch.stack(rewards).double(), "ref_logprobs": response_logprobs(cfg, ref_lm, prompt_tokens, T, eot, V).cpu(),
            **({"gold": torch.stack(golds).double()} if gold_fn else {})}


@torch.no_grad()
def exact_eval(lm, space, lam):
    """The exact objective of the policy lm, by enumeration, averaged over prompts: E[R] (reward_exact),
    KL(pi || pi_init) (kl_exact), J = E[R] - lambda KL (J_exact), J* = lambda log E_{pi_init}[exp(R/lambda)]
    (jstar_exact), the gap J* - J = lambda KL(pi || pi*) (gap_exact) and KL(pi || pi*) (klstar_exact)."""
    logp = response_logprobs(space["cfg"], lm, space["prompt_tokens"], space["max_new_tokens"], space["eot"],
                             space["V"]).cpu()                           # (X, n)
    ref_logp, R = space["ref_logprobs"], space["rewards"]                # (X, n), (X, n)
    p = logp.exp()                                                       # (X, n) pi(y|x), sums to 1 over y
    reward, kl = (p * R).sum(1), (p * (logp - ref_logp)).sum(1)          # (X,), (X,)
    jstar = lam * torch.logsumexp(ref_logp + R / lam, 1)                 # (X,) lambda log Z(x)
    klstar = (p * (logp - ref_logp - R / lam)).sum(1) + jstar / lam      # (X,) KL(pi || pi*)
    stats = {"reward_exact": reward, "kl_exact": kl, "J_exact": reward - lam * kl, "jstar_exact": jstar,
             "gap_exact": jstar - (reward - lam * kl), "klstar_exact": klstar}
    if "gold" in space:                                                  # the judge: its score, and the frontier
        stats["gold_exact"] = (p * space["gold"]).sum(1)                 # (X,) E_pi[G]
    out = {k: v.mean().item() for k, v in stats.items()}
    if "gold" in space:
        out["gold_frontier_exact"], out["gold_frontier_lam"] = frontier(ref_logp, space["gold"], out["kl_exact"])
        out["gold_lost_exact"] = out["gold_frontier_exact"] - out["gold_exact"]
    return out


def frontier(ref_logp, G, kl):
    """The best mean score of the judge G (X, n) that any policy reaches with a mean KL to pi_init of at most kl, over
    the X prompts: the policies pi_init exp(G/lambda') / Z, one lambda' for all prompts, are the judge's own pi*, and
    each maximises E[G] among the policies with its KL or less (docs/theory.md, "The judge's frontier"). lambda' is
    found by bisection on log lambda' (to 1e-10), since their KL falls as lambda' grows; the bracket starts at the
    judge's own scale (G / lambda' depends on lambda' / scale only) and widens until it holds kl. Past the KL of
    the best responses alone (lambda' -> 0) the frontier is their score. Returns (the frontier's E[G], lambda')."""
    ref_logp = ref_logp - ref_logp.logsumexp(1, keepdim=True)            # (X, n) pi_init, summing to 1 to the last bit
    def tilt(lam):                                                       # -> (E[G], KL) of pi_init exp(G/lam) / Z
        logp = torch.log_softmax(ref_logp + G / lam, 1)                  # (X, n)
        p = logp.exp()
        return (p * G).sum(1).mean().item(), (p * (logp - ref_logp)).sum(1).mean().item()
    best = G.max(1, keepdim=True).values                                 # (X, 1)
    kl_best = -ref_logp.masked_fill(G < best, -math.inf).logsumexp(1).mean().item()  # pi_init on the best alone
    if kl >= kl_best:                                                    # as far as any tilt goes: the best G
        return best.mean().item(), 0.0
    if kl <= 0:                                                          # pi_init itself
        return (ref_logp.exp() * G).sum(1).mean().item(), math.inf
    scale = math.log((best - G.min(1, keepdim=True).values).max().item())  # > 0: else kl_best would be 0
    lo = hi = scale
    while tilt(math.exp(lo))[1] < kl and lo > scale - 600:               # KL rises to kl_best as lambda' falls
        lo -= 2
    while tilt(math.exp(hi))[1] > kl and hi < scale + 600:               # and falls to 0 as it grows
        hi += 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilt(math.exp(mid))[1] > kl else (lo, mid)
    return tilt(math.exp(hi))[0], math.exp(hi)
