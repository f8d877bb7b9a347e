"""
How good a policy is, by sampling: J*, the best KL-regularised objective any policy can reach, estimated from
pi_init's samples (the `gap` of the log line), and the held-out evaluation (eval_reward, eval_kl, eval_J) on
prompts that RL never trains on. lab/exact.py computes J, J* and the gap exactly instead, where the responses are
few enough to list. Neither changes a training number: each draws from a random stream of its own.
Also `python train.py --sample=out/policy`: a trained policy's completions of a prompt, with their reward.
"""
import dataclasses
import json
import math
import os
import time

import torch
from transformers import AutoModelForCausalLM

import data
from lab.cli import status
from lab.hf import load_pretrained
from lab.static_sampler import DECODERS, choose_sampler
from model import autocast, check_fits, get_device, lm_forward, sample, token_logprobs


@torch.no_grad()
def estimate_jstar(cfg, lm, prompt_tokens, prompts, reward_fn, enc, device):
    """J* = E_x[lambda log E_{y ~ pi_init}[exp(R/lambda)]], the best J any policy can reach, from
    jstar_samples samples per prompt, and its standard error (delta method, per prompt)."""
    torch.manual_seed(4321)                                              # the same estimate for every run
    rows, n, t0 = torch.arange(len(prompts)).repeat_interleave(cfg.jstar_samples), cfg.jstar_samples, time.time()
    scores = []
    for chunk in rows.split(512):
        scores.append(sample(cfg, lm, chunk.tolist(), prompt_tokens, prompts, reward_fn, enc, device,
                             choose_sampler(cfg, device))[-1])
        k = sum(map(len, scores))
        status(f"estimating J* from pi_init: {k}/{len(rows)} samples | {time.time() - t0:.0f}s", done=k == len(rows))
    DECODERS.clear()                                                     # a GPU's decoders of 512 rows: not needed again
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
def evaluate(cfg, policy, ref_lm, eval_tokens, eval_prompts, reward_fn, enc, device, it):
    """The policy on the held-out prompts: eval_samples fresh responses (the prompts in turn), their mean reward
    (eval_reward), KL to pi_init (eval_kl) and J (eval_J). Its own random stream: a run draws the same training
    numbers with or without it."""
    rows, scores, kls = [i % len(eval_prompts) for i in range(cfg.eval_samples)], [], []
    with torch.random.fork_rng(devices=stream_devices(device)):
        torch.manual_seed(1_000_003 * (cfg.seed + 1) + it)
        for k in range(0, len(rows), cfg.batch_size):
            prompt_ids, prompt_mask, response, mask, logprobs, _, s = sample(
                cfg, policy.lm, rows[k:k + cfg.batch_size], eval_tokens, eval_prompts, reward_fn, enc, device,
                choose_sampler(cfg, device))
            with autocast(cfg, device):
                ref_logits, _ = lm_forward(ref_lm, torch.cat([prompt_ids, response], 1), torch.cat(
                    [prompt_mask, torch.ones_like(response)], 1), prompt_ids.shape[1], enc.n_vocab)  # (B, T, V)
            kls.append(((logprobs - token_logprobs(ref_logits, response)) * mask).sum(1))  # (B,) KL estimate
            scores.append(s)
    scores, kl = torch.cat(scores), torch.cat(kls)                       # (eval_samples,)
    return {"eval_reward": scores.mean().item(), "eval_kl": kl.mean().item(),
            "eval_J": (scores - cfg.lam * kl).mean().item()}


@torch.no_grad()
def sample_policy(cfg, Config):
    """`python train.py --sample=out/policy --prompt="the movie was"`: completions of a trained policy with
    their reward, using the tokenizer and reward of its run (read from apa_config.json beside it, into train.Config)."""
    config_path = os.path.join(cfg.sample, "apa_config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{cfg.sample} holds no trained policy ({config_path} is missing)")
    try:
        with open(config_path) as f:
            run = Config(**json.load(f))
    except (ValueError, TypeError) as e:                                 # not JSON, not an object, unknown fields
        raise ValueError(f"{config_path} is damaged ({e}): it is written by train.py at the end of a run") from None
    if run.init and not run.tokenizer and data.ships_tokenizer(cfg.sample):  # the tokenizer saved beside it
        run = dataclasses.replace(run, init=cfg.sample)
    device = get_device(cfg)
    enc, _, _, reward_fn = data.load_data(run, device)
    lm = load_pretrained(AutoModelForCausalLM, cfg.sample, "--sample").to(device).eval()
    task = data.task_prompts()
    prompts = [cfg.prompt] * cfg.num_samples if cfg.prompt else [task[i % len(task)] for i in range(cfg.num_samples)]
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    check_fits(enc, prompt_tokens, run.max_new_tokens, lm.config)
    torch.manual_seed(cfg.seed)
    *_, completions, scores = sample(run, lm, range(len(prompts)), prompt_tokens, prompts, reward_fn, enc, device,
                                     choose_sampler(run, device))
    for prompt, completion, score in zip(prompts, completions, scores.tolist()):
        print(f"{prompt!r} -> {completion!r} | reward {score:+.2f}")
    return completions, scores.tolist()
