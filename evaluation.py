"""
How good a policy is, by sampling: J*, the best KL-regularised objective any policy can reach, estimated from
pi_init's samples (the `gap` of the log line), and the held-out evaluation (eval_reward, eval_kl, eval_J) on
prompts that RL never trains on. lab/exact.py computes J, J* and the gap exactly instead, where the responses are
few enough to list. Neither changes a training number: each draws from a random stream of its own. Both sample
with the run's sampler, sampler(lm, idx, prompt_tokens), which train.make_sampler builds once: model.sample with
the run's generate function (model.generate, or the GPU's static decoder).
"""
import math
import time

import torch

from data import call_reward
from model import autocast, lm_forward, status, token_logprobs


@torch.no_grad()
def estimate_jstar(cfg, lm, prompt_tokens, prompts, reward_fn, sampler):
    """J* = E_x[lambda log E_{y ~ pi_init}[exp(R/lambda)]], the best J any policy can reach, from
    jstar_samples samples per prompt, and its standard error (delta method, per prompt)."""
    torch.manual_seed(4321)                                              # the same estimate for every run
    rows, n, t0 = torch.arange(len(prompts)).repeat_interleave(cfg.jstar_samples), cfg.jstar_samples, time.time()
    scores = []
    for chunk in rows.split(512):
        *_, completions = sampler(lm, chunk.tolist(), prompt_tokens)
        scores.append(call_reward(cfg, reward_fn, [prompts[i] for i in chunk.tolist()], completions))  # (512,)
        k = sum(map(len, scores))
        status(f"estimating J* from pi_init: {k}/{len(rows)} samples | {time.time() - t0:.0f}s", done=k == len(rows))
    scores = torch.cat(scores)                                           # (prompts * n,)
    w = torch.exp(scores.double().cpu() / cfg.lam).view(len(prompts), n)  # (prompts, n) exp(R / lambda)
    jstar_x = cfg.lam * w.mean(1).log()                                  # (prompts,) J*(x)
    se_x = cfg.lam * w.std(1) / (w.mean(1) * math.sqrt(n))               # (prompts,) its standard error
    return jstar_x.mean().item(), (se_x.pow(2).sum().sqrt() / len(prompts)).item()


def stream_devices(device):
    """The devices whose random streams a block of its own must fork, so that the training stream is as it was after
    it: the CPU's always (fork_rng's own), and device's where it is a GPU (the sampler draws there)."""
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def evaluate(cfg, policy, ref_lm, eval_tokens, eval_prompts, reward_fn, sampler, it, gold_fn=None, evaluator_fn=None):
    """The policy on the held-out prompts: eval_samples fresh responses (the prompts in turn), their mean reward
    (eval_reward), KL to pi_init (eval_kl), J (eval_J), and the mean scores of the judge (eval_gold) and of the
    evaluator model (eval_evaluator) where there are. Its own random stream: a run draws the same training numbers
    with or without it."""
    rows, scores, kls, golds, evals = [i % len(eval_prompts) for i in range(cfg.eval_samples)], [], [], [], []
    device = policy.v_head.weight.device                                 # the policy's
    with torch.random.fork_rng(devices=stream_devices(device)):
        torch.manual_seed(1_000_003 * (cfg.seed + 1) + it)
        for k in range(0, len(rows), cfg.batch_size):
            idx = rows[k:k + cfg.batch_size]
            prompt_ids, prompt_mask, response, mask, logprobs, completions = sampler(policy.lm, idx, eval_tokens)
            s = call_reward(cfg, reward_fn, [eval_prompts[i] for i in idx], completions).to(device)  # (B,)
            if gold_fn:
                golds.append(call_reward(cfg, gold_fn, [eval_prompts[i] for i in idx], completions,
                                         f"gold function {cfg.gold_fn}"))  # (B,) the judge's
            if evaluator_fn:
                evals.append(call_reward(cfg, evaluator_fn, [eval_prompts[i] for i in idx], completions,
                                         f"evaluator {cfg.evaluator}"))  # (B,) the evaluator model's
            with autocast(cfg, device):
                ref_logits, _ = lm_forward(ref_lm, torch.cat([prompt_ids, response], 1), torch.cat(
                    [prompt_mask, torch.ones_like(response)], 1), prompt_ids.shape[1], policy.n_vocab)  # (B, T, V)
            kls.append(((logprobs - token_logprobs(ref_logits, response)) * mask).sum(1))  # (B,) KL estimate
            scores.append(s)
    scores, kl = torch.cat(scores), torch.cat(kls)                       # (eval_samples,)
    return {"eval_reward": scores.mean().item(), "eval_kl": kl.mean().item(),
            "eval_J": (scores - cfg.lam * kl).mean().item(),
            **({"eval_gold": torch.cat(golds).mean().item()} if golds else {}),
            **({"eval_evaluator": torch.cat(evals).mean().item()} if evals else {})}
