"""The judge (--gold_fn): a scorer the run never trains on, logged beside the reward it trains on, and measured exactly
against the frontier, the best score of the judge that any policy reaches at the same KL to pi_init."""
import copy
import dataclasses
import os
import sys

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import evaluation  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from lab import exact, hf  # noqa: E402
from test_exact import task  # noqa: E402,F401  (the module's pi_init fixture)
from test_train import read_metrics, tiny_args  # noqa: E402


def judged_problem(seed=0, X=3, n=7):
    """X prompts, n responses each: pi_init's log-probs and the judge's scores G, in float64."""
    g = torch.Generator().manual_seed(seed)
    ref_logp = torch.log_softmax(torch.randn(X, n, generator=g, dtype=torch.float64), 1)  # (X, n)
    G = torch.rand(X, n, generator=g, dtype=torch.float64) * 2 - 1                        # (X, n) in [-1, 1]
    return ref_logp, G, g


def gold_and_kl(logp, ref_logp, G):
    """E[G] and KL(pi || pi_init), each a mean over the prompts."""
    p = logp.exp()
    return (p * G).sum(1).mean().item(), (p * (logp - ref_logp)).sum(1).mean().item()


def test_no_policy_beats_the_frontier_and_the_judges_tilts_lie_on_it():
    """The frontier at KL k is max E[G] over the policies with mean KL k. The judge's own tilts pi_init exp(G/l) / Z,
    one l for all prompts, reach it (the bisection finds their l back), and 2,000 other policies, random ones and
    tilts with a temperature of their own for each prompt, never pass it."""
    ref_logp, G, g = judged_problem()
    for lam in (0.05, 0.2, 1.0, 5.0):
        gold, kl = gold_and_kl(torch.log_softmax(ref_logp + G / lam, 1), ref_logp, G)
        best, found = exact.frontier(ref_logp, G, kl)
        assert best == pytest.approx(gold, abs=1e-7) and found == pytest.approx(lam, rel=1e-5)
    beaten = 0
    for i in range(2000):
        if i % 2:                                                        # any policy at all
            logp = torch.log_softmax(3 * torch.randn(ref_logp.shape, generator=g, dtype=torch.float64), 1)
        else:                                                            # each prompt its own temperature: not on it
            lams = torch.exp(3 * torch.rand(ref_logp.shape[0], 1, generator=g, dtype=torch.float64) - 2)
            logp = torch.log_softmax(ref_logp + G / lams, 1)
        gold, kl = gold_and_kl(logp, ref_logp, G)
        best, _ = exact.frontier(ref_logp, G, kl)
        assert gold <= best + 1e-9
        beaten += gold < best - 1e-4
    assert beaten > 1500                                                 # the bound is no tautology: most fall short


def per_prompt_frontier(ref_logp, G, k):
    """max E[G] over the policies of one prompt with KL k, by bisection of that prompt's own tilt, in numpy."""
    def tilt(lam):
        logp = ref_logp + G / lam
        logp = logp - np.logaddexp.reduce(logp)
        p = np.exp(logp)
        return (p * G).sum(), (p * (logp - ref_logp)).sum()
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilt(math.exp(mid))[1] > k else (lo, mid)
    return tilt(math.exp(hi))[0]


def test_the_frontier_is_the_best_split_of_the_kl_between_the_prompts():
    """A slow version: with two prompts and a mean KL k, try every split of the KL, k1 to the first prompt and
    2k - k1 to the second, each prompt at its own best (its own tilt); the best split is the frontier. Matching each
    prompt at the KL k alone is not."""
    ref_logp, G, _ = judged_problem(2, X=2)
    ref, g = ref_logp.numpy(), G.numpy()
    for k in (0.05, 0.2, 0.5):
        split = lambda a: (per_prompt_frontier(ref[0], g[0], a) + per_prompt_frontier(ref[1], g[1], 2 * k - a)) / 2  # noqa: E731
        grid = np.linspace(0, 2 * k, 41)
        i = max(range(len(grid)), key=lambda i: split(grid[i]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for _ in range(60):                                              # each prompt's best is concave in its KL
            a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            lo, hi = (a, hi) if split(a) < split(b) else (lo, b)
        found, _ = exact.frontier(ref_logp, G, k)
        assert found == pytest.approx(split(lo), abs=1e-8), k
        alone = (per_prompt_frontier(ref[0], g[0], k) + per_prompt_frontier(ref[1], g[1], k)) / 2
        assert found > alone + 1e-3                                      # one KL for each prompt falls short


@pytest.mark.parametrize("scale", [1e-4, 1e-3, 1.0, 1e3])
def test_the_frontier_follows_the_judges_scale(scale):
    """The frontier of the judge scale G is scale times G's: the tilt's lambda' scales with it. Policies whose KL lies
    within the tilts' range (each prompt its own temperature) never pass it."""
    ref_logp, G, g = judged_problem(3)
    for k in (0.01, 0.1, 0.5, 50.0):
        best, lam = exact.frontier(ref_logp, G * scale, k)
        want, want_lam = exact.frontier(ref_logp, G, k)
        assert best == pytest.approx(scale * want, rel=1e-8) and lam == pytest.approx(scale * want_lam, rel=1e-6)
    for _ in range(200):
        lams = torch.exp(2 * torch.rand(ref_logp.shape[0], 1, generator=g, dtype=torch.float64) - 1)
        gold, kl = gold_and_kl(torch.log_softmax(ref_logp + G / lams, 1), ref_logp, G * scale)
        assert gold <= exact.frontier(ref_logp, G * scale, kl)[0] + 1e-9 * scale


def test_the_frontier_at_its_ends():
    """At KL 0 the frontier is pi_init's E[G]; past the KL of the best responses alone it is the best E[G]."""
    ref_logp, G, _ = judged_problem(1)
    assert exact.frontier(ref_logp, G, 0.0)[0] == pytest.approx((ref_logp.exp() * G).sum(1).mean().item(), abs=1e-7)
    assert exact.frontier(ref_logp, G, 50.0)[0] == pytest.approx(G.max(1).values.mean().item(), abs=1e-9)


def test_exact_eval_reports_the_judge_and_the_loss_against_the_frontier(task):  # noqa: F811
    """exact_eval with a judge: gold_exact is E_pi[G] by enumeration, each response judged against its own prompt,
    and gold_lost_exact is the frontier at the policy's own KL minus it. pi_init loses nothing; with the proxy as its
    own judge, neither does the proxy's pi* at any lambda."""
    cfg = dataclasses.replace(task.cfg, max_new_tokens=2, gold_fn="data:sentiment_reward")
    length = lambda prompts, completions: [len(c) / 20 for c in completions]  # noqa: E731  a proxy, not the judge
    judge = lambda prompts, completions: [s + 0.5 * task.prompts.index(p) for p, s in  # noqa: E731
                                          zip(prompts, data.sentiment_reward(prompts, completions))]
    space = exact.response_space(cfg, task.ref_lm, task.prompt_tokens, task.prompts, length, task.enc, judge)
    assert torch.equal(space["gold"][1] - space["gold"][0], torch.full_like(space["gold"][0], 0.5))  # its own prompt
    for lam in (0.01, 0.1, 1.0):                                         # the proxy's pi*, judged by the proxy
        R, ref_logp = space["rewards"], torch.log_softmax(space["ref_logprobs"], 1)  # summing to 1 to the last bit
        gold, kl = gold_and_kl(torch.log_softmax(ref_logp + R / lam, 1), ref_logp, R)
        assert exact.frontier(ref_logp, R, kl)[0] - gold == pytest.approx(0, abs=1e-9)
    stats = exact.exact_eval(task.ref_lm, space, cfg.lam)                # pi_init: KL 0, on the frontier's start
    ref_p = space["ref_logprobs"].exp()
    assert stats["gold_exact"] == pytest.approx((ref_p * space["gold"]).sum(1).mean().item(), abs=1e-12)
    assert stats["kl_exact"] == pytest.approx(0, abs=1e-9) and abs(stats["gold_lost_exact"]) < 1e-6
    assert stats["reward_exact"] != pytest.approx(stats["gold_exact"], abs=1e-3)   # the two scores are two
    policy = model.PolicyWithValue(copy.deepcopy(task.ref_lm))
    with torch.no_grad():
        policy.lm.lm_head.weight.add_(0.3 * torch.randn(policy.lm.lm_head.weight.shape))  # a policy that moved
    stats = exact.exact_eval(policy.lm, space, cfg.lam)
    logp = exact.response_logprobs(cfg, policy.lm, task.prompt_tokens, 2, task.enc.eot_token, task.enc.n_vocab).cpu()
    gold, kl = gold_and_kl(logp, space["ref_logprobs"], space["gold"])
    assert stats["gold_exact"] == pytest.approx(gold, abs=1e-9) and stats["kl_exact"] == pytest.approx(kl, abs=1e-9)
    best, _ = exact.frontier(space["ref_logprobs"], space["gold"], kl)
    assert stats["gold_lost_exact"] == pytest.approx(best - gold, abs=1e-9) and stats["gold_lost_exact"] > 1e-3


def test_the_judge_is_logged_and_never_trained_on(task):  # noqa: F811
    """The rollout scores each completion with the reward, against its own prompt, and with the judge too (gold: their
    mean); the batch that trains is the one a rollout without a judge makes, to the last bit."""
    cfg = train.resolve(dataclasses.replace(task.cfg, gold_fn="data:sentiment_reward"))
    length = lambda prompts, completions: [len(c) / 20 + (p == task.prompts[0]) for p, c in zip(prompts, completions)]  # noqa: E731
    judge = lambda prompts, completions: [s + 3 * (p == task.prompts[1]) for p, s in  # noqa: E731
                                          zip(prompts, data.sentiment_reward(prompts, completions))]
    policy = model.PolicyWithValue(copy.deepcopy(task.ref_lm)).eval()
    out = {}
    for judged in (False, True):
        torch.manual_seed(0)
        out[judged] = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, length,
                                    train.make_sampler(cfg, task.enc, torch.device("cpu")),
                                    judge if judged else None)
    (batch, _, stats, samples), (judged_batch, _, judged_stats, judged_samples) = out[False], out[True]
    assert batch.keys() == judged_batch.keys() and all(torch.equal(batch[k], judged_batch[k]) for k in batch)
    assert samples == judged_samples and "gold" not in stats
    gold = judge([s[0] for s in samples], [s[1] for s in samples])                # each against its own prompt
    assert judged_stats["gold"] == pytest.approx(sum(gold) / len(gold), abs=1e-6)
    assert judged_stats["reward"] == pytest.approx(sum(s[2] for s in samples) / len(samples), abs=1e-6)
    assert all(score == pytest.approx(length([prompt], [completion])[0], abs=1e-6) for prompt, completion, score, _ in samples)
    assert {s[0] for s in samples} == set(task.prompts)                  # both prompts, each scored as itself


def test_the_held_out_evaluation_reports_the_judges_mean_each_response_against_its_prompt(task):  # noqa: F811
    """eval_gold is the mean of the judge's scores of the held-out responses, each against its own prompt; eval_reward
    the mean of the reward's, which differ."""
    cfg = train.resolve(dataclasses.replace(task.cfg, gold_fn="m:judge", eval_samples=12, batch_size=8))
    seen = {"reward": [], "gold": []}
    def scorer(key, fn):
        def score(prompts, completions):
            scores = fn(prompts, completions)
            seen[key] += list(zip(prompts, scores))
            return scores
        return score
    proxy = scorer("reward", lambda prompts, completions: [len(c) / 20 for c in completions])
    judge = scorer("gold", lambda prompts, completions: [s + 3 * (p == task.prompts[1]) for p, s in
                                                         zip(prompts, data.sentiment_reward(prompts, completions))])
    policy = model.PolicyWithValue(copy.deepcopy(task.ref_lm)).eval()
    stats = evaluation.evaluate(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, proxy,
                                train.make_sampler(cfg, task.enc, torch.device("cpu")), 1, judge)
    assert [p for p, _ in seen["gold"]] == [task.prompts[i % 2] for i in range(12)] == [p for p, _ in seen["reward"]]
    assert stats["eval_gold"] == pytest.approx(sum(s for _, s in seen["gold"]) / 12, abs=1e-6)
    assert stats["eval_reward"] == pytest.approx(sum(s for _, s in seen["reward"]) / 12, abs=1e-6)
    assert stats["eval_gold"] != pytest.approx(stats["eval_reward"], abs=1e-3)


def test_the_judge_defaults_to_the_tasks_reward_where_a_reward_model_stands_in_for_it():
    resolve = lambda **kw: train.resolve(train.Config(**kw)).gold_fn  # noqa: E731
    assert resolve() == "" and resolve(reward_fn="data:sentiment_reward") == ""
    assert resolve(reward_model="rm") == "data:sentiment_reward"         # the embedded task: its own reward judges
    assert resolve(reward_model="rm", prompts="p.txt") == ""             # another task: no judge unless asked
    assert resolve(reward_model="rm", gold_fn="m:f") == resolve(reward_fn="x:y", gold_fn="m:f") == "m:f"


def test_a_run_against_a_reward_model_logs_the_judge_beside_it(tmp_path, capsys):
    """train.py --reward_model=DIR --gold_fn=...: the log line, metrics.jsonl and the held-out evaluation carry the
    judge's score beside the proxy's, and with 2-token responses the exact judge and the loss to the frontier."""
    enc = data.task_encoding()
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1,
                                                  n_head=2, num_labels=1, pad_token_id=enc.eot_token))
    rm.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text("the movie was\nthe plot felt\n")   # two prompts: 183,014 responses to
    (tmp_path / "eval.txt").write_text("the cast was truly\n")             # score exactly, with both rewards
    train.main(tiny_args(str(tmp_path / "sft"), tmp_path / "out", iters=2, max_new_tokens=2, exact_every=1,
                         eval_every=1, eval_samples=8, batch_size=8, minibatch_size=8, sft_steps=20,
                         reward_model=str(tmp_path / "rm"), prompts=str(tmp_path / "prompts.txt"),
                         eval_prompts=str(tmp_path / "eval.txt"), gold_fn="data:sentiment_reward"))
    printed = capsys.readouterr().out
    rows = read_metrics(tmp_path / "out")
    assert "judge data:sentiment_reward" in printed and " | gold " in printed and " | eval_gold " in printed
    assert " | gold_lost_exact " in printed
    for row in rows:
        assert {"gold", "eval_gold", "gold_exact", "gold_frontier_exact", "gold_lost_exact"} <= row.keys()
        assert row["gold_lost_exact"] >= -1e-6 and row["gold_frontier_exact"] >= row["gold_exact"] - 1e-6
        assert row["reward"] != pytest.approx(row["gold"], abs=1e-6)     # the proxy is not the judge


def reward_model_folder(path, seed):
    """A tiny random sequence classifier with one output, saved as a Hugging Face folder: a reward model whose scores
    are its own (another seed, other scores)."""
    enc = data.task_encoding()
    torch.manual_seed(seed)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                             num_labels=1, pad_token_id=enc.eot_token)).save_pretrained(path)
    return str(path)


def test_the_proxy_the_evaluator_and_the_judge_each_score_the_same_completions(task, tmp_path):  # noqa: F811
    """The rollout and the held-out evaluation score each completion with the proxy (reward), the evaluator model
    (evaluator, eval_evaluator) and the judge (gold, eval_gold): each logged mean is its own scorer's mean on the same
    completions, called here directly, and the three differ. The batch that trains is the one without the evaluator."""
    cfg = train.resolve(dataclasses.replace(task.cfg, eval_samples=8, batch_size=16, minibatch_size=16))
    proxy, evaluator = (hf.reward_model_fn(reward_model_folder(tmp_path / name, seed), task.enc, torch.device("cpu"))
                        for name, seed in (("proxy", 0), ("evaluator", 1)))
    scorers = {"reward": proxy, "evaluator": evaluator, "gold": data.sentiment_reward}
    policy = model.PolicyWithValue(copy.deepcopy(task.ref_lm)).eval()
    out = {}
    for judged in (False, True):
        torch.manual_seed(0)
        out[judged] = train.rollout(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, proxy,
                                    train.make_sampler(cfg, task.enc, torch.device("cpu")),
                                    gold_fn=data.sentiment_reward if judged else None,
                                    evaluator_fn=evaluator if judged else None)
    (batch, _, stats, _), (judged_batch, _, judged_stats, samples) = out[False], out[True]
    assert batch.keys() == judged_batch.keys() and all(torch.equal(batch[k], judged_batch[k]) for k in batch)
    assert "evaluator" not in stats and "gold" not in stats
    prompts, completions = [s[0] for s in samples], [s[1] for s in samples]
    direct = {k: sum(fn(prompts, completions)) / len(samples) for k, fn in scorers.items()}
    assert {k: judged_stats[k] for k in scorers} == pytest.approx(direct, abs=1e-6)
    assert min(abs(direct[a] - direct[b]) for a, b in (("reward", "evaluator"), ("reward", "gold"),
                                                        ("evaluator", "gold"))) > 1e-3   # three scores, not one
    seen = {}
    def recording(key):                                                  # what each scorer is handed
        def score(prompts, completions):
            seen.setdefault(key, []).append((list(prompts), list(completions)))
            return scorers[key](prompts, completions)
        return score
    held_out = train.evaluate(cfg, policy, task.ref_lm, task.prompt_tokens, task.prompts, recording("reward"),
                              train.make_sampler(cfg, task.enc, torch.device("cpu")), 0,
                              recording("gold"), recording("evaluator"))
    assert seen["reward"] == seen["evaluator"] == seen["gold"]           # the same completions, to the same prompts
    texts = [(p, c) for prompts, completions in seen["reward"] for p, c in zip(prompts, completions)]
    assert len(texts) == cfg.eval_samples
    for key in scorers:
        direct = sum(scorers[key]([p for p, _ in texts], [c for _, c in texts])) / len(texts)
        assert held_out[f"eval_{key}"] == pytest.approx(direct, abs=1e-6), key


def test_a_run_with_an_evaluator_logs_the_proxy_the_evaluator_and_the_judge(tmp_path, capsys):
    """train.py --reward_model=A --evaluator=B on the embedded task (the judge: the task's reward): the header names the
    evaluator, and the log line, metrics.jsonl and the held-out evaluation carry its score beside the other two."""
    proxy, evaluator = reward_model_folder(tmp_path / "proxy", 0), reward_model_folder(tmp_path / "evaluator", 1)
    train.main(tiny_args(str(tmp_path / "sft"), tmp_path / "out", iters=2, max_new_tokens=4, eval_every=1,
                         eval_samples=8, batch_size=8, minibatch_size=8, sft_steps=20, reward_model=proxy,
                         evaluator=evaluator))
    printed = capsys.readouterr().out
    assert f"judge data:sentiment_reward | evaluator {evaluator}" in printed
    lines = [line for line in printed.splitlines() if line.startswith("iter ")]
    assert len(lines) == 2 and all(" | reward " in line and " | gold " in line and " | evaluator " in line
                                   and " | eval_evaluator " in line for line in lines)
    for row in read_metrics(tmp_path / "out"):
        assert {"reward", "gold", "evaluator", "eval_reward", "eval_gold", "eval_evaluator"} <= row.keys()
        for a, b in (("reward", "evaluator"), ("gold", "evaluator")):
            assert abs(row[a] - row[b]) > 1e-4 and abs(row[f"eval_{a}"] - row[f"eval_{b}"]) > 1e-4
