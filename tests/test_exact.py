"""
Tests of train.py's wiring, against slow, obvious versions and against the exact optimum:

1. the exact evaluator (exact.exact_eval) against a brute-force enumeration and against the sampler;
2. the pieces of a rollout (ref log-probs, logged KL, padding, per-token rewards, GAE, whitening) and
   the loss that `update` calls for each algorithm and form (the README's fixed-point table);
3. end to end: short responses (max_new_tokens=2), so that J* - J of the trained policy is known exactly.

Run: python -m pytest -q tests/test_exact.py. tools/mutate.py shows which one-line bugs these catch.
"""
import copy
import dataclasses
import itertools
import math
import os
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import grpo  # noqa: E402
import model  # noqa: E402
import ppo  # noqa: E402
import train  # noqa: E402
from lab import exact  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=150, sft_lr=3e-3, batch_size=32,
            minibatch_size=16, epochs=2, lr=1e-3, jstar_samples=0, sample_every=0, eval_every=0, device="cpu")
PROMPTS = ["the movie was", "the plot felt"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """pi_init (the tiny GPT pre-trained on the task), tokenizer, two prompts, the task's reward."""
    tmp = tmp_path_factory.mktemp("exact")
    prompts_file = tmp / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    sft_dir = os.environ.get("APA_TEST_SFT_DIR") or str(tmp / "sft")   # tools/mutate.py shares one pi_init
    cfg = train.Config(**TINY, sft_dir=sft_dir, prompts=str(prompts_file))
    enc = data.task_encoding()
    ref_lm = model.pretrain(cfg, enc, torch.device("cpu")).eval().requires_grad_(False)
    return types.SimpleNamespace(cfg=cfg, enc=enc, ref_lm=ref_lm, tmp=tmp, prompts=PROMPTS,
                                 prompt_tokens=[enc.encode_ordinary(p) for p in PROMPTS],
                                 reward_fn=data.sentiment_reward)


def cpu_sampler(cfg, enc):
    """The run's sampler on a CPU, as train.train builds it."""
    return train.make_sampler(cfg, enc, torch.device("cpu"))


def moved_policy(ref_lm, seed=0, scale=0.05):
    """A policy with value head that is not pi_init: weights perturbed, value head random."""
    g = torch.Generator().manual_seed(seed)
    policy = model.PolicyWithValue(copy.deepcopy(ref_lm)).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# 1. the exact evaluator

def test_exact_eval_matches_brute_force_enumeration():
    """Vocabulary 5 (end-of-text 4), 3 new tokens: every response generate can return, its log-prob from a
    forward pass of the whole sequence, and J, J*, KL from their definitions."""
    V, T, eot, lam = 5, 3, 4, 0.3
    def gpt(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          bos_token_id=eot, eos_token_id=eot)).eval()
    ref_lm, lm = gpt(0), gpt(1)
    enc = types.SimpleNamespace(eot_token=eot, n_vocab=V, decode_batch=lambda rows: [" ".join(map(str, r)) for r in rows])
    def reward_fn(prompts, completions):                                 # the prompt, the tokens and their number
        return [c.count("1") - 0.5 * c.count("2") + 0.1 * len(p) + 0.2 * len(c.split()) for p, c in zip(prompts, completions)]
    prompts, prompt_tokens = ["ab", "abc"], [[1, 2], [3, 0, 1]]
    cfg = train.Config(max_new_tokens=T)
    space = exact.response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc)
    got = exact.exact_eval(lm, space, lam)

    responses = sorted({seq[:seq.index(eot) + 1] if eot in seq else seq
                        for seq in itertools.product(range(V), repeat=T)})  # stop at end-of-text, truncate at T
    assert len(responses) == exact.n_responses(V, T) == space["rewards"].shape[1]
    def logprob(lm, prompt, response):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([prompt + list(response)])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        return sum(logp[len(prompt) - 1 + j, a].item() for j, a in enumerate(response))
    want = {k: 0.0 for k in got}
    for prompt, tokens in zip(prompts, prompt_tokens):
        lp = torch.tensor([logprob(lm, tokens, r) for r in responses], dtype=torch.float64)
        ref = torch.tensor([logprob(ref_lm, tokens, r) for r in responses], dtype=torch.float64)
        R = torch.tensor(reward_fn([prompt] * len(responses), [" ".join(str(a) for a in r if a != eot)
                                                               for r in responses]), dtype=torch.float64)
        assert abs(lp.exp().sum().item() - 1) < 1e-5 and abs(ref.exp().sum().item() - 1) < 1e-5
        p = lp.exp()
        reward, kl = (p * R).sum().item(), (p * (lp - ref)).sum().item()
        jstar = lam * math.log((ref.exp() * torch.exp(R / lam)).sum().item())
        star = ref + R / lam - jstar / lam                               # log pi*
        for k, v in dict(reward_exact=reward, kl_exact=kl, J_exact=reward - lam * kl, jstar_exact=jstar,
                         gap_exact=jstar - reward + lam * kl, klstar_exact=(p * (lp - star)).sum().item()).items():
            want[k] += v / len(prompts)
    for k in got:
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert got["gap_exact"] == pytest.approx(lam * got["klstar_exact"], abs=1e-6) and got["gap_exact"] > 0
    # and the sampler draws from exactly these probabilities: its mean reward agrees within 4 standard errors
    torch.manual_seed(0)
    ids, mask = model.left_pad([prompt_tokens[1]] * 4000, eot, torch.device("cpu"))
    response, _, _ = model.generate(lm, ids, mask, T, eot)
    R = torch.tensor(reward_fn([prompts[1]] * 4000, enc.decode_batch([[a for a in r if a != eot]
                                                                        for r in response.tolist()])))
    p = exact.response_logprobs(cfg, lm, [prompt_tokens[1]], T, eot, V)[0].exp()
    mean_reward = (p * space["rewards"][1]).sum().item()
    assert abs(R.mean().item() - mean_reward) < 4 * R.std().item() / math.sqrt(4000)


def test_too_many_responses_means_no_exact_evaluation(task):
    cfg = train.Config(max_new_tokens=3)                                 # 2 x 303^3 responses: too many
    assert exact.response_space(cfg, task.ref_lm, task.prompt_tokens, task.prompts, task.reward_fn, task.enc) is None


# ----------------------------------------------------------------------------------------------
# 2. the pieces of a rollout, each against a slow version

FORMS = [("apa", "exact"), ("apa", "paper"), ("apa", "authors"), ("ppo", "exact"), ("awr", "exact"), ("grpo", "exact"),
         ("grpo", "dr"), ("rloo", "exact"), ("grpo", "reward"), ("rloo", "k2"), ("rloo", "k3_is")]
# every algorithm and form (dr: Dr. GRPO; reward, k2, k3_is: where GRPO's or RLOO's KL goes, --kl)


def form_config(algo, form, **kw):
    return train.Config(**{**TINY, **kw}, algo=algo, apa_form=form if form in ("paper", "authors") else "exact",
                        grpo_std=form != "dr", kl=form if form in ("reward", "k1", "k2", "k3", "k3_is") else "auto")


def slow_row(lm, prompt, response):
    """log pi of each response token, the hidden states before them and the entropy of pi there, from one unpadded
    forward pass."""
    out = lm(input_ids=torch.tensor([prompt + response]), output_hidden_states=True)
    states = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
    logp = torch.log_softmax(out.logits[0, states].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp[torch.arange(len(response)), response], out.hidden_states[-1][0, states], entropy


@pytest.mark.parametrize("algo,form", FORMS)
def test_rollout_against_slow_versions(task, algo, form):
    cfg = train.resolve(form_config(algo, form, batch_size=24, gamma=0.97, gae_lambda=0.8, max_new_tokens=8))
    assert cfg.kl == {"grpo": form if form in ("reward", "k2", "k3_is") else "k3",       # each algorithm's own place
                      "rloo": form if form in ("k2", "k3_is") else "reward"}.get(algo, "auto")  # for the KL
    policy = moved_policy(task.ref_lm)
    torch.manual_seed(0)
    batch, P, stats, samples = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts,
                                             task.reward_fn, cpu_sampler(cfg, task.enc))
    eot, mask = task.enc.eot_token, batch["mask"]
    assert 0 < mask.sum() < mask.numel()                                # some rows ended early
    coef = 0.0 if form in ("paper", "authors") else cfg.lam             # AWR too: the KL-penalised reward
    kls, raw_adv, entropies = [], [], []
    with torch.no_grad():
        for i in range(cfg.batch_size):
            prompt = batch["input_ids"][i, :P][batch["attention_mask"][i, :P] == 1].tolist()
            row = batch["response"][i].tolist()
            n = row.index(eot) + 1 if eot in row else len(row)            # real tokens: up to the first end-of-text
            assert row[n:] == [eot] * (len(row) - n)                     # the sampler pads with end-of-text
            assert mask[i].tolist() == [1.0] * n + [0.0] * (len(row) - n)
            logp, hidden, entropy = slow_row(policy.lm, prompt, row[:n])
            ref, _, _ = slow_row(task.ref_lm, prompt, row[:n])
            entropies.append(entropy)
            values = policy.v_head(hidden).squeeze(-1).double()
            torch.testing.assert_close(batch["ref_logprobs"][i, :n].double(), ref, atol=1e-4, rtol=0)  # pi_init
            torch.testing.assert_close(batch["logprobs"][i, :n].double(), logp, atol=1e-4, rtol=0)
            kls.append((logp - ref).sum().item())
            assert samples[i][3] == pytest.approx(kls[-1], abs=1e-4)     # the sample's kl: real tokens only
            assert samples[i][2] == task.reward_fn([samples[i][0]], [task.enc.decode(row[:n - (row[n - 1] == eot)])])[0]
            rewards = -coef * (logp - ref)
            rewards[-1] += samples[i][2]                                 # the score on the last real token
            adv, next_adv = torch.zeros(n, dtype=torch.float64), 0.0     # GAE, a Python loop; V = 0 after the end
            for t in reversed(range(n)):
                next_value = values[t + 1] if t + 1 < n else 0.0
                next_adv = rewards[t] + cfg.gamma * next_value - values[t] + cfg.gamma * cfg.gae_lambda * next_adv
                adv[t] = next_adv
            raw_adv.append(adv)
            assert batch["advantages"][i, n:].abs().sum() == 0
            if algo not in ("grpo", "rloo"):                             # GRPO and RLOO: no values, no returns
                torch.testing.assert_close(batch["values"][i, :n].double(), values, atol=1e-4, rtol=0)
                torch.testing.assert_close(batch["returns"][i, :n].double(), adv + values, atol=1e-4, rtol=0)
                assert batch["returns"][i, n:].abs().sum() == 0
    assert ("values" in batch) == ("returns" in batch) == (algo not in ("grpo", "rloo"))
    assert stats["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-5)
    assert stats["entropy"] == pytest.approx(torch.cat(entropies).mean().item(), abs=1e-4)  # over real tokens
    flat = torch.cat(raw_adv)
    if algo == "ppo" or form == "authors":                               # PPO and the authors' APA whiten, over real
        flat = (flat - flat.mean()) / flat.std(unbiased=False)          # tokens; the other APAs and AWR never
    if algo in ("grpo", "rloo"):                                         # one advantage per response, from its group
        k = cfg.group_size
        assert k == 4 and all(len({s[0] for s in samples[g:g + k]}) == 1 for g in range(0, cfg.batch_size, k))
        per_response = []                                                # of k responses to one prompt
        for g in range(0, cfg.batch_size, k):                            # R - lambda KL where the KL is in the reward
            R = [s[2] - (cfg.kl == "reward") * cfg.lam * kl for s, kl in zip(samples[g:g + k], kls[g:g + k])]
            for i, r in enumerate(R):
                others = R[:i] + R[i + 1:]
                per_response.append(r - sum(others) / (k - 1) if algo == "rloo" else
                                    (r - sum(R) / k) / ((torch.tensor(R).std().item() + 1e-4) if form != "dr" else 1))
        flat = torch.cat([torch.full((int(m.sum()),), a, dtype=torch.float64) for a, m in zip(per_response, mask)])
    torch.testing.assert_close(batch["advantages"][mask > 0].double(), flat, atol=1e-4, rtol=1e-4)


def test_sampler_pads_finished_rows_with_end_of_text():
    torch.manual_seed(0)
    V, eot = 5, 4
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                    bos_token_id=eot, eos_token_id=eot)).eval()
    ids, mask = model.left_pad([[0, 1], [2]] * 32, eot, torch.device("cpu"))
    response, resp_mask, logprobs = model.generate(lm, ids, mask, 10, eot)
    ended = 0
    for row, m, lp in zip(response.tolist(), resp_mask.tolist(), logprobs.tolist()):
        if eot in row:
            n = row.index(eot) + 1
            ended += n < len(row)
            assert row[n:] == [eot] * (len(row) - n) and m[n:] == [0.0] * (len(row) - n) and lp[n:] == [0.0] * (len(row) - n)
    assert ended > 0


def test_approx_kl_is_the_exact_kl_and_zero_when_nothing_moved():
    """With the old policy's probabilities as weights on all (state, action) pairs, the masked mean is an exact
    expectation: approx_kl must equal KL(pi_old || pi_theta), for the function and for both losses' stats."""
    torch.manual_seed(0)
    S, A = 3, 4
    old = torch.log_softmax(torch.randn(S, A, dtype=torch.float64), -1)  # (S, A)
    new = torch.log_softmax(torch.randn(S, A, dtype=torch.float64), -1)
    weights = old.exp().flatten()[None]                                  # (1, S A)
    exact = (old.exp() * (old - new)).sum(1).mean().item()               # mean over states of KL(old || new)
    lp, olp, zeros = new.flatten()[None], old.flatten()[None], torch.zeros(1, S * A, dtype=torch.float64)
    assert ppo.approx_kl(lp, olp, weights) == pytest.approx(exact, abs=1e-12)
    assert train.apa_loss(lp, olp, zeros, weights, 0.1)[1]["approx_kl"] == pytest.approx(exact, abs=1e-12)
    assert train.ppo_policy_loss(lp, olp, zeros, weights)[1]["approx_kl"] == pytest.approx(exact, abs=1e-12)
    assert ppo.approx_kl(olp, olp, weights) == 0.0
    samples = torch.randn(8, 5)                                          # any log-probs: never negative
    assert ppo.approx_kl(samples, torch.randn(8, 5), torch.ones(8, 5)) >= 0


@pytest.mark.parametrize("algo,form", FORMS)
def test_update_calls_the_loss_of_the_readme_table(task, algo, form, monkeypatch):
    """| default APA: anchor pi_old (ref None) | paper: anchor pi_init | PPO: clipped surrogate | AWR: awr_lam |, each
    with the rollout's log-probs and advantages, and the value loss clipped around the rollout's values; the steps
    taken are epochs x minibatches."""
    cfg = train.resolve(form_config(algo, form, batch_size=24, minibatch_size=24, epochs=2, max_new_tokens=8,
                                    target_kl=0, apa_clip=0.5 if form == "exact" else 0.0))  # the guard: below
    policy = moved_policy(task.ref_lm)
    torch.manual_seed(0)
    batch, P, _, _ = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, task.reward_fn,
                                   cpu_sampler(cfg, task.enc))
    calls = []
    def spy(name, fn):
        def wrapped(*args):
            calls.append((name, args))
            return fn(*args)
        monkeypatch.setattr(train, name, wrapped)
    for name in ("apa_loss", "ppo_policy_loss", "awr_loss", "grpo_loss", "value_loss"):
        spy(name, getattr(train, name))
    monkeypatch.setattr(torch, "randperm", lambda n: torch.arange(n))    # one minibatch an epoch, in order
    v_head = copy.deepcopy(policy.v_head.state_dict())
    stats = train.update(cfg, policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, P)
    critic_free = algo in ("grpo", "rloo")                               # their value head takes no step, no loss
    assert all(torch.equal(v, policy.v_head.state_dict()[k]) == critic_free for k, v in v_head.items())
    assert stats["steps"] == 2 and len(calls) == (2 if critic_free else 4)
    (pg_name, pg), *rest = calls                                         # epoch 1: pi_theta = pi_old; epoch 2: moved
    same = lambda a, b: torch.equal(a, b)                                # noqa: E731
    assert same(pg[0], batch["logprobs"]) or torch.allclose(pg[0], batch["logprobs"], atol=1e-5)  # pi_theta = pi_old
    in_loss = algo in ("grpo", "rloo")                                   # grpo_loss, with the KL in it or in R
    assert same(pg[1], batch["logprobs"]) and (in_loss or same(pg[2], batch["advantages"]) and same(pg[3], batch["mask"]))
    if algo == "apa":                                                    # the exact form here is the bounded one
        assert pg_name == "apa_loss" and pg[4] == cfg.lam and pg[6] == (0.5 if form == "exact" else 0.0)
        assert (pg[5] is None) if form == "exact" else same(pg[5], batch["ref_logprobs"])
    elif algo == "awr":                                                  # its own temperature, not lambda
        assert pg_name == "awr_loss" and pg[4] == cfg.awr_lam != cfg.lam and pg[5] == cfg.awr_max_weight
    elif in_loss:                                                        # pg: logprobs, old, ref, adv, mask, lam, eps, kl
        assert pg_name == "grpo_loss" and same(pg[2], batch["ref_logprobs"]) and pg[5] == cfg.lam
        assert pg[6] == cfg.cliprange and same(pg[3], batch["advantages"]) and same(pg[4], batch["mask"])
        assert pg[7] is {"k3": grpo.k3, "k2": grpo.k2, "k3_is": grpo.k3_is, "reward": None}[cfg.kl]
    else:                                                                # PPO
        assert pg_name == "ppo_policy_loss" and pg[4] == cfg.cliprange
    if not critic_free:
        (vf_name, vf), _, (_, vf2) = rest
        assert not torch.allclose(vf2[0], batch["values"]) and torch.equal(vf2[1], batch["values"])  # clip around V_old
        assert vf_name == "value_loss" and same(vf[1], batch["values"]) and same(vf[2], batch["returns"])
        assert same(vf[3], batch["mask"]) and vf[4] == cfg.cliprange_value
        torch.testing.assert_close(vf[0].detach(), batch["values"], atol=1e-5, rtol=0)
    # the KL guard: the second minibatch sees approx_kl > target_kl after the first step, and takes no step
    batch, P, _, _ = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, task.reward_fn,
                                   cpu_sampler(cfg, task.enc))                                 # pi_old: the policy as it is now
    calls.clear()
    opt, steps = torch.optim.SGD(policy.parameters(), lr=0.1), []
    step = opt.step
    opt.step = lambda: steps.append(1) or step()                        # noqa: E731
    stats = train.update(dataclasses.replace(cfg, target_kl=1e-9), policy, opt, batch, P)
    assert len(calls) == (2 if critic_free else 4) and len(steps) == stats["steps"] == 1
    assert stats["kl_stop"] == stats["approx_kl_max"] > 1e-9


def test_the_kl_guard_ends_the_whole_update(task, monkeypatch):
    """Once a minibatch's approx_kl passes target_kl, that minibatch takes no step and neither does any later one,
    in this epoch or the next: the update ends. The loss's approx_kl is scripted, 0 except on the third minibatch,
    the first of the second epoch."""
    cfg = train.resolve(form_config("apa", "exact", batch_size=24, minibatch_size=12, epochs=3, max_new_tokens=8,
                                    target_kl=0.2))
    policy = moved_policy(task.ref_lm)
    torch.manual_seed(0)
    batch, P, _, _ = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, task.reward_fn,
                                   cpu_sampler(cfg, task.enc))
    script, real = iter([0.0, 0.0, 0.5] + [0.0] * 3), train.apa_loss
    monkeypatch.setattr(train, "apa_loss", lambda *a: (real(*a)[0], {"approx_kl": next(script)}))
    opt, steps = torch.optim.SGD(policy.parameters(), lr=0.1), []
    step = opt.step
    opt.step = lambda: steps.append(1) or step()                        # noqa: E731
    stats = train.update(cfg, policy, opt, batch, P)
    assert len(steps) == stats["steps"] == 2 and stats["kl_stop"] == stats["approx_kl_max"] == 0.5
    assert len(list(script)) == 3                                        # no loss taken after the stop


# ----------------------------------------------------------------------------------------------
# 3. end to end: train.main with max_new_tokens=2, then the trained policy's exact distance to pi*

def run(task, name, **overrides):
    """train.main on the two prompts with max_new_tokens=2; returns the history (metrics of every iteration)."""
    args = dict(TINY, sft_dir=task.cfg.sft_dir, prompts=task.cfg.prompts, max_new_tokens=2,
                out_dir=str(task.tmp / name))
    args.update(overrides)
    return train.main([f"--{k}={v}" for k, v in args.items()])


def test_sampled_gap_and_jstar_agree_with_exact_and_exact_eval_uses_no_randomness(task):
    history = run(task, "sampled", algo="ppo", iters=16, exact_every=1, jstar_samples=256, eval_every=1,
                  eval_samples=256, eval_prompts=task.cfg.prompts)       # "held out": here the training prompts
    first = history[0]
    assert abs(first["jstar"] - first["jstar_exact"]) < 4 * first["jstar_se"]  # J*: within its standard error
    K = len(history)
    for key in ("reward", "kl", "J"):                                   # each iteration: one batch of the policy
        for sampled in (key, "eval_" + key):                            # that the exact evaluator saw, and the
            d = torch.tensor([h[sampled] - h[key + "_exact"] for h in history])  # held-out evaluation's samples
            assert abs(d.mean().item()) < 4 * d.std().item() / math.sqrt(K), sampled
    d = torch.tensor([h["gap"] - h["gap_exact"] for h in history])
    assert abs(d.mean().item()) < 4 * math.sqrt(d.var().item() / K + first["jstar_se"] ** 2)
    assert history[-1]["kl_exact"] > 0.01                               # the policy moved
    # the exact evaluation draws no random number, the held-out one draws from its own stream: the same run
    # without them prints the same numbers
    plain = run(task, "plain", algo="ppo", iters=3, exact_every=0, jstar_samples=256)
    keys = [k for k in plain[0] if k not in ("ms", "mem_mb")]
    assert [[h[k] for k in keys] for h in plain] == [[h[k] for k in keys] for h in history[:3]]


E2E = dict(iters=60, exact_every=0, target_kl=0)                        # as measured before the KL guard
GUARD = 0.01     # a target_kl that stops many updates: approx_kl_max unguarded, measured over 60 iterations:
                 # median 0.008 (APA) and 0.009 (PPO), 90th percentile 0.05, largest 0.11-0.13
TINY_LAM = train.Config().lam
MEASURED = {}                                                           # variant -> exact stats, for the report


def mixed_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """The paper form's update (pi_init anchor) with the KL-penalised reward: the tempting mix."""
    return ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, TINY_LAM)


def whitened_gae(rewards, values, mask, gamma, lam):
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    return ppo.masked_whiten(advantages, mask), returns


VARIANTS = {"apa": dict(algo="apa"), "ppo": dict(algo="ppo"), "paper": dict(algo="apa", apa_form="paper"),
            "mixed": dict(algo="apa", apa_form="paper"), "whitened": dict(algo="apa"),
            "apa_guarded": dict(algo="apa", target_kl=GUARD), "ppo_guarded": dict(algo="ppo", target_kl=GUARD),
            "apa_lora": dict(algo="apa", lora_r=8, lr=3e-3, iters=120),    # adapters learn slower: 3x lr, 2x steps
            "apa_bounded": dict(algo="apa", apa_clip=0.5), "rloo": dict(algo="rloo"), "grpo": dict(algo="grpo"),
            "dr_grpo": dict(algo="grpo", grpo_std=False)}
PATCHES = {"mixed": ("kl_penalized_rewards", mixed_rewards), "whitened": ("gae", whitened_gae)}


@pytest.fixture(scope="module")
def trained(task):
    """Each variant trained once (on demand); its final policy evaluated exactly for lambda and 2 lambda."""
    space = exact.response_space(train.Config(max_new_tokens=2), task.ref_lm, task.prompt_tokens, task.prompts,
                                 task.reward_fn, task.enc)
    results = {}
    def get(name):
        if name not in results:
            with pytest.MonkeyPatch.context() as mp:
                if name in PATCHES:
                    mp.setattr(train, *PATCHES[name])
                history = run(task, name, **{**E2E, **VARIANTS[name]})
            lm = GPT2LMHeadModel.from_pretrained(task.tmp / name / "policy").eval()
            results[name] = (exact.exact_eval(lm, space, TINY_LAM), exact.exact_eval(lm, space, 2 * TINY_LAM), history)
            MEASURED[name] = results[name]
            print(name, {k: round(v, 4) for k, v in results[name][0].items()},
                  "gap at 2 lambda", round(results[name][1]["gap_exact"], 4))
        return results[name]
    return get


@pytest.mark.parametrize("name", ["apa", "ppo", "rloo", "apa_bounded"])
def test_default_apa_ppo_rloo_and_bounded_apa_reach_the_optimum(trained, name):
    exact, *_ = trained(name)
    # from 0.421 at pi_init; measured 0.0128 (APA), 0.0155 (PPO), 0.0190 (RLOO), 0.0282 (bounded APA, c = 0.5:
    # its first updates are clipped, so it is slower)
    assert exact["gap_exact"] < (0.04 if name == "apa_bounded" else 0.03)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_grpo_stays_farther_from_the_optimum(trained, name):
    """GRPO's fixed point is not pi* (tests/test_grpo.py); here it overshoots: measured gap 0.110 (KL 5.74 nats) and
    0.087 (Dr. GRPO, KL 3.88) after 60 iterations, where APA ends at 0.0128 (KL 2.30)."""
    exact, apa = trained(name)[0], trained("apa")[0]
    assert exact["gap_exact"] > max(0.05, 3 * apa["gap_exact"]) and exact["kl_exact"] > apa["kl_exact"] + 1


@pytest.mark.parametrize("name", ["apa_guarded", "ppo_guarded"])
def test_the_kl_guard_moves_no_fixed_point(trained, name):
    """With a target_kl that stops many updates early, the trained policy still ends as close to pi*."""
    exact, _, history = trained(name)
    stopped = sum("kl_stop" in row for row in history)
    print(name, "updates stopped by the guard:", stopped, "of", len(history))
    assert stopped >= len(history) // 4 and exact["gap_exact"] < 0.03


def test_lora_reaches_the_optimum_too(trained):
    """LoRA (rank 8 on every linear layer, LM head included) from pi_init's gap of 0.421: measured 0.040 after
    120 iterations at lr 3e-3 (full fine-tuning: 0.0128 after 60 at 1e-3)."""
    pytest.importorskip("peft")
    exact, *_ = trained("apa_lora")
    assert exact["gap_exact"] < 0.06


def test_paper_form_stays_farther_from_the_optimum(trained):
    assert trained("paper")[0]["gap_exact"] > max(0.1, 3 * trained("apa")[0]["gap_exact"])  # measured 0.2-0.35


def test_mixed_form_lands_near_the_optimum_for_two_lambda(trained):
    """KL(pi || pi*_{2 lambda}) = gap(2 lambda) / (2 lambda) is the smaller one for the mix, not for the default.
    Measured after 60 iterations: the mix is still far from both (KL 2.87 nats to pi*_{2 lambda}, 4.42 to
    pi*_lambda; gap 0.44), the default 0.128 from pi*_lambda and 0.580 from pi*_{2 lambda}."""
    mixed, apa = trained("mixed"), trained("apa")
    kl_to = lambda r: (r[0]["klstar_exact"], r[1]["klstar_exact"])     # noqa: E731 (lambda, 2 lambda)
    assert kl_to(mixed)[1] < kl_to(mixed)[0]
    assert kl_to(apa)[0] < 0.5 * kl_to(apa)[1]                          # measured: 0.128 and 0.580


def test_whitening_apa_advantages_changes_the_steps_of_the_run(trained):
    """Whitening leaves the default APA's fixed point at pi* (test_losses.py) but rescales every step by the batch's
    std: the run is another. Measured after 60 iterations: gap 0.0238 against 0.0128, KL to pi_init 1.85 against
    2.30 nats."""
    whitened, apa = trained("whitened")[0], trained("apa")[0]
    assert whitened["gap_exact"] > 1.5 * apa["gap_exact"] and abs(whitened["kl_exact"] - apa["kl_exact"]) > 0.25
