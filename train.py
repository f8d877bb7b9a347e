"""
RLHF of a small GPT with APA, PPO, AWR, GRPO or RLOO, in one readable loop: sample, score, estimate values
and advantages, update. They share everything but the advantages and the policy loss (apa.py, ppo.py,
grpo.py: GRPO and RLOO sample k responses per prompt and take no value head). Beside them:
model.py (the policy with its value head, the tiny GPT, checked loading of a checkpoint, LoRA), sampler.py,
data.py (tokenizers, prompts, rewards), evaluation.py (J* and the held-out evaluation, by sampling), exact.py
(the exact evaluator), common.py (command line, one-line errors, checkpoints, data-parallel helpers).

Paper: Zhu et al. 2023, "Fine-Tuning Language Models with Advantage-Induced Policy Alignment",
arXiv 2306.02231. Run: python train.py  (APA on the embedded task, a few minutes on a CPU)
          python train.py --algo=ppo --iters=100 --lam=0.2   (any field of Config as --key=value)
          python compare.py   (all of them over seeds and learning rates: compare.py)
          torchrun --nproc_per_node=N train.py   (data parallel over N GPUs, the same algorithm: README)

Where this departs from the paper and the authors' code:
1. APA's target is anchored on pi_old and the reward carries the per-token KL penalty, so the loss's
   fixed point is exactly pi* = pi_init exp(R/lambda)/Z (apa.py explains; --apa_form=paper gives the
   paper's literal loss: pi_init anchor, no KL in the reward, as the authors' code runs it).
2. One lambda is both APA's temperature (the authors' adv_coeff_sq is 1/lambda) and the reward's KL
   coefficient, for both algorithms, so that both aim at the same pi*. PPO whitens its advantages
   (standard); APA does not (whitening would change its effective lambda).
3. The policy and value share one trunk (a scalar head on the last hidden state), as in trlx.
4. pi_init is a tiny GPT pre-trained here on a generated corpus, not an SFT model of 125M-6B
   parameters, and the reward is a lexicon, not a reward model (both can be swapped: --init,
   --reward_model, --reward_fn, --prompts).
5. A KL guard that neither the paper nor the authors' code has: an update stops once a minibatch's
   approx_kl exceeds target_kl (0.2, which the default run never reaches; 0 turns it off).
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from apa import apa_loss, awr_loss
from common import (check_rules, exclusive, gather_all, global_mean, global_token_means, init_distributed, keep_previous_run,
                    load_checkpoint, one_line_errors, parse_args, peak_memory_mb, rank, read_checkpoint, save_checkpoint,
                    world_size, write_config)
from data import load_data
from evaluation import distinct_n, estimate_jstar, evaluate, sample_policy
from exact import exact_eval, response_space
from grpo import group_advantages, grpo_loss, rloo_advantages
from model import (autocast, check_fits, entropy, get_device, init_config, lm_forward, load_lm, make_optimizer, make_policy,
                   pretrain, quiet, token_logprobs)
from ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, value_loss
from sampler import sample

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # --- algorithm
    algo: Literal["apa", "ppo", "awr", "grpo", "rloo"] = "apa"  # APA (apa.py: apa_loss), PPO (ppo.py), AWR (apa.py:
                                   # awr_loss), GRPO or RLOO (grpo.py)
    apa_form: Literal["exact", "paper"] = "exact"  # exact: pi_old anchor, KL in the reward (fixed point pi*);
                                   # paper: pi_init anchor, no KL in the reward (the paper's literal loss)
    apa_clip: float = 0.0          # bounded APA: Adv/lambda clipped to [-c, c] in APA's target (0: unbounded)
    group_size: int | None = None  # k, responses per prompt (consecutive in the batch); default 4 for grpo and
                                   # rloo, which need k >= 2, else 1
    grpo_std: bool = True          # GRPO divides its advantages by the group's std (0: Dr. GRPO, it does not)
    lam: float = 0.1               # lambda: KL coefficient in the reward, and APA's Adv/lambda
    gamma: float = 1.0             # discount
    gae_lambda: float = 0.95       # GAE's lambda
    cliprange: float = 0.2         # PPO's epsilon
    cliprange_value: float = 0.2   # value clipping around the rollout's values
    vf_coef: float = 0.1           # weight of the value loss
    awr_lam: float = 0.5           # AWR's temperature lambda' in exp(Adv/lambda') (the authors' HH config: 0.5)
    awr_max_weight: float = 20.0   # AWR's clip of exp(Adv/lambda') (Peng et al. 2019)
    # --- optimisation
    seed: int = 0                  # seeds sampling and minibatch order
    iters: int = 300               # RL iterations (one rollout and one update each)
    batch_size: int = 64           # responses per rollout
    minibatch_size: int = 32       # responses per gradient step
    epochs: int = 4                # passes over each rollout
    lr: float | None = None        # Adam learning rate of the RL updates; default: 3e-5 for the tiny GPT (larger ones
                                   # destabilise APA), 1e-6 with --init (a pretrained model: README, "Your own model")
    target_kl: float = 0.2         # the KL guard: an update stops once a minibatch's approx_kl exceeds it (0: never)
    max_grad_norm: float = 1.0     # gradient clipping
    max_bad_steps: int = 3         # stop after this many non-finite losses or gradients in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # bf16 autocast for the forward passes (logits, log-probs,
                                   # values and losses stay fp32); auto: bf16 on cuda, fp32 on cpu
    cuda_graph: bool = True        # on a GPU, sample 8 tokens per CUDA graph replay (0: the eager loop, a CPU's)
    # --- data and models
    prompts: str = ""              # prompts file (.txt, one a line; .jsonl, {"prompt": ...}); empty: the embedded task
    eval_prompts: str = ""         # held-out prompts file (as --prompts), never trained on; empty: the embedded
                                   # task's held-out openings (none with --prompts)
    reward_fn: str = "data:sentiment_reward"  # 'module:function' (prompts, completions) -> floats
    reward_model: str = ""         # Hugging Face sequence-classification model (path or id); replaces reward_fn
    init: str = ""                 # Hugging Face causal LM (path or id) as pi_init; empty: pre-train a tiny GPT
    tokenizer: str = ""            # "task", "gpt2" (tiktoken) or a Hugging Face tokenizer (path or id); empty: the
                                   # --init checkpoint's own (GPT-2's BPE if it ships none), else "task"
    max_new_tokens: int = 20       # response length limit (the task's reviews take at most 18)
    lora_r: int = 0                # LoRA's rank: only adapters train, pi_init is the network with them off (0: off;
                                   # needs peft: pip install peft)
    lora_alpha: float = 16.0       # LoRA's scale alpha / r
    lora_targets: str = "all"      # the modules that get adapters: all (every linear layer, the LM head too), or
                                   # names (q_proj,v_proj; c_attn,c_fc on GPT-2)
    grad_checkpointing: bool = False  # recompute each layer's activations in the backward pass: less memory, slower
    n_layer: int = 2               # layers of the tiny GPT
    n_head: int = 4                # attention heads of the tiny GPT
    n_embd: int = 128              # width of the tiny GPT
    block_size: int = 64           # context window of the tiny GPT
    sft_steps: int = 300           # pre-training steps of the tiny GPT on the task corpus (cached)
    sft_lr: float = 1e-3           # pre-training learning rate
    # --- output
    out_dir: str = "out"           # metrics.jsonl, ckpt.pt, policy/
    sft_dir: str = "out/sft"       # cache of the pre-trained tiny GPT
    sample_every: int = 50         # print decoded samples every N iterations (0: never)
    ckpt_every: int = 50           # checkpoint every N iterations (0: only at the end)
    resume: bool = False           # continue from out_dir/ckpt.pt
    eval_every: int = 25           # eval_reward, eval_kl, eval_J on fresh samples of the held-out prompts every N
                                   # iterations (0: never)
    eval_samples: int = 128        # responses per held-out evaluation
    jstar_samples: int = 256       # samples per prompt from pi_init to estimate J* (0: skip)
    exact_every: int = 10          # J, J* and the gap computed exactly, by enumerating every response, every N
                                   # iterations (0: never); only runs when that is at most exact.EXACT_LIMIT responses
                                   # in all, e.g. --max_new_tokens=2 on the task (not at the default 20)
    # --- sampling from a trained policy
    sample: str = ""               # a trained policy's folder (out/policy): print completions with their reward, then exit
    prompt: str = ""               # the prompt to complete with --sample; empty: the first task prompts
    num_samples: int = 4           # completions printed by --sample


def validate(cfg):
    """Refuse settings that mean nothing, saying why, before anything is read or written."""
    check_rules(cfg, [  # (field, holds, what it must be)
        ("lam", cfg.lam > 0, "> 0"),
        ("awr_lam", cfg.awr_lam > 0, "> 0 (AWR's temperature)"),
        ("apa_clip", cfg.apa_clip >= 0, ">= 0 (0: unbounded APA)"),
        ("group_size", cfg.group_size is None or cfg.group_size >= (2 if cfg.algo in CRITIC_FREE else 1),
         f"{'>= 2 for ' + cfg.algo + ' (a baseline from the other responses)' if cfg.algo in CRITIC_FREE else '>= 1'}"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("iters", cfg.iters > 0, "> 0"),
        ("batch_size", cfg.batch_size > 0, "> 0"),
        ("minibatch_size", cfg.minibatch_size > 0, "> 0"),
        ("epochs", cfg.epochs > 0, "> 0 (passes over each rollout)"),
        ("max_new_tokens", cfg.max_new_tokens > 0, "> 0 (a response has at least one token)"),
        ("lr", cfg.lr is None or 0 <= cfg.lr <= 0.1, "in [0, 0.1]: Adam moves every weight by about lr a step, so "
                                                     "more wrecks a language model in a few steps (1e-6 to 1e-3 are usual)"),
        ("target_kl", cfg.target_kl >= 0, ">= 0 (0: no KL guard)"),
        ("eval_every", cfg.eval_every >= 0, ">= 0 (0: never)"),
        ("eval_samples", cfg.eval_samples > 0, "> 0"),
        ("max_grad_norm", cfg.max_grad_norm > 0, "> 0 (gradients are clipped to this norm)"),
        ("gamma", 0 <= cfg.gamma <= 1, "in [0, 1] (a discount)"),
        ("gae_lambda", 0 <= cfg.gae_lambda <= 1, "in [0, 1] (GAE's bias-variance trade-off)"),
        ("vf_coef", cfg.vf_coef >= 0, ">= 0 (the weight of the value loss)"),
        ("cliprange", cfg.cliprange > 0, "> 0 (PPO keeps the ratio in [1 - cliprange, 1 + cliprange])"),
        ("cliprange_value", cfg.cliprange_value > 0, "> 0 (values move at most this far from the rollout's)"),
        ("max_bad_steps", cfg.max_bad_steps > 0, "> 0 (non-finite steps in a row before stopping)"),
        ("n_layer", cfg.n_layer > 0, "> 0"),
        ("n_head", cfg.n_head > 0, "> 0"),
        ("n_embd", cfg.n_embd > 0 and cfg.n_embd % max(cfg.n_head, 1) == 0,
         f"> 0 and divisible by n_head={cfg.n_head} (each head gets n_embd / n_head dimensions)"),
        ("block_size", cfg.block_size > 0, "> 0"),
        ("sft_steps", cfg.sft_steps > 0, "> 0 (pre-training steps)"),
        ("sft_lr", 0 < cfg.sft_lr <= 0.1, "in (0, 0.1]"),
        ("sample_every", cfg.sample_every >= 0, ">= 0 (0: never)"),
        ("ckpt_every", cfg.ckpt_every >= 0, ">= 0 (0: only at the end)"),
        ("jstar_samples", cfg.jstar_samples == 0 or cfg.jstar_samples >= 2,
         "0 (no J*) or >= 2 (its standard error needs two samples per prompt)"),
        ("awr_max_weight", cfg.awr_max_weight > 0, "> 0 (AWR's clip of its weights)"),
        ("out_dir", cfg.out_dir != "", "a folder"),
        ("sft_dir", cfg.sft_dir != "", "a folder (the cache of the pre-trained tiny GPT)"),
        ("num_samples", cfg.num_samples > 0, "> 0"),
        ("lora_r", cfg.lora_r >= 0, ">= 0 (0: no LoRA)"),
        ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
        ("lora_targets", cfg.lora_targets != "", "all or module names"),
    ])
    if cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by minibatch_size {cfg.minibatch_size}")
    k = resolve(cfg).group_size
    if cfg.batch_size % k:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by group_size {k}")
    for path in (cfg.prompts, cfg.eval_prompts):
        if path and not os.path.isfile(path):
            raise ValueError(f"{path} " + ("is a folder, not a prompts file" if os.path.isdir(path) else "does not exist"))
    sources = [("--init", cfg.init, False), ("--reward_model", cfg.reward_model, False),
               ("--tokenizer", "" if cfg.tokenizer in ("task", "gpt2") else cfg.tokenizer, True)]
    for flag, path, tokenizer in sources:                               # a local path, or a hub id ("gpt2", "org/name")
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ValueError(f"{path} does not exist")
        if path and not cfg.sample:
            data.check_source(flag, path, tokenizer)
    if cfg.sample and not os.path.isdir(cfg.sample):
        raise ValueError(f"--sample={cfg.sample} is no folder (a trained policy is a folder: out/policy)")
    get_device(cfg)


RESUME_MAY_CHANGE = {"iters", "lr", "out_dir", "sft_dir", "sample_every", "ckpt_every", "max_bad_steps", "resume",
                     "device", "precision", "sample", "prompt", "num_samples", "exact_every", "eval_prompts",
                     "eval_every", "eval_samples", "grad_checkpointing", "cuda_graph"}  # any other change mixes two runs


CRITIC_FREE = ("grpo", "rloo")   # advantages from the group, no value loss


def resolve(cfg):
    """The config with the defaults that depend on other fields filled in: the learning rate (README), k."""
    return dataclasses.replace(cfg, lr=cfg.lr if cfg.lr is not None else 1e-6 if cfg.init else 3e-5,
                               group_size=cfg.group_size or (4 if cfg.algo in CRITIC_FREE else 1))


# ---------------------------------------------------------------------------------------------
# rollout: sample, score, and everything the update needs


@torch.no_grad()
def rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, enc, device):
    # 1. sample prompts (this process's share, each k times in a row), responses from pi_old, scores
    k = cfg.group_size
    idx = torch.randint(len(prompts), (cfg.batch_size // world_size() // k,)).repeat_interleave(k).tolist()
    prompt_ids, prompt_mask, response, mask, _, completions, scores = sample(
        cfg, policy.lm, idx, prompt_tokens, prompts, reward_fn, enc, device)
    input_ids = torch.cat([prompt_ids, response], 1)                     # (B, P + T)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)  # (B, P + T)
    P = prompt_ids.shape[1]
    # 2. log-probs under pi_old and pi_init, values (one set of (B, T, V) logits alive at a time)
    with autocast(cfg, device):
        logits, values = policy(input_ids, attention_mask, P)            # (B, T, V), (B, T)
    logprobs = token_logprobs(logits, response)                          # (B, T) log pi_old
    entropies = entropy(logits)                                          # (B, T)
    del logits
    with autocast(cfg, device):
        ref_logits, _ = lm_forward(ref_lm, input_ids, attention_mask, P, enc.n_vocab)  # (B, T, V)
    ref_logprobs = token_logprobs(ref_logits, response)                  # (B, T) log pi_init
    del ref_logits
    # 3. per-token rewards with the KL penalty, then GAE (the paper's literal APA: no KL in the reward)
    kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form == "paper" else cfg.lam
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)  # (B, T)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
    kl = ((logprobs - ref_logprobs) * mask).sum(1)                       # (B,) sequence KL estimate
    if cfg.algo == "ppo":
        advantages = masked_whiten(advantages, mask, mean_fn=global_mean)  # mean and variance over all processes
    elif cfg.algo in CRITIC_FREE:                                        # one advantage per response, from its group:
        advantages = mask * (group_advantages(scores, k, cfg.grpo_std) if cfg.algo == "grpo"  # the score alone, or
                             else rloo_advantages(scores - cfg.lam * kl, k))[:, None]  # R - lambda KL (B, T)
    stats = {"reward": global_mean(scores).item(), "kl": global_mean(kl).item(),   # over all processes
             "J": global_mean(scores - cfg.lam * kl).item(),
             "entropy": global_mean(entropies, mask).item(),
             "distinct2": distinct_n(gather_all(completions), 2), "length": global_mean(mask.sum(1)).item()}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, advantages=advantages,
                 returns=returns)
    samples = list(zip([prompts[i] for i in idx], completions, scores.tolist(), kl.tolist()))
    return batch, P, stats, samples


# ---------------------------------------------------------------------------------------------
# update: several epochs of minibatches; the algorithms differ only in the policy loss; the KL guard
# (target_kl) stops it once a minibatch has moved too far from pi_old


def update(cfg, policy, opt, batch, P, bad_steps):
    stats, world, kls, guard = [], world_size(), [], {}
    B = cfg.batch_size // world                                          # this process's share
    for _ in range(cfg.epochs):
        if guard:
            break
        for mb_inds in torch.randperm(B).split(cfg.minibatch_size // world):
            mb = {k: v[mb_inds.to(v.device)] for k, v in batch.items()}
            with autocast(cfg, mb["response"].device):
                logits, values = policy(mb["input_ids"], mb["attention_mask"], P)  # (b, T, V), (b, T)
            logprobs = token_logprobs(logits, mb["response"])            # (b, T) log pi_theta
            if cfg.algo == "apa":
                ref = mb["ref_logprobs"] if cfg.apa_form == "paper" else None
                pg_loss, pg_stats = apa_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.lam, ref,
                                             cfg.apa_clip)
            elif cfg.algo == "awr":
                pg_loss, pg_stats = awr_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.awr_lam,
                                             cfg.awr_max_weight)
            elif cfg.algo == "grpo":
                pg_loss, pg_stats = grpo_loss(logprobs, mb["logprobs"], mb["ref_logprobs"], mb["advantages"],
                                              mb["mask"], cfg.lam, cfg.cliprange)
            else:                                                        # PPO and RLOO: the clipped surrogate
                pg_loss, pg_stats = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.cliprange)
            vf_loss, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.cliprange_value)
            if cfg.algo in CRITIC_FREE:                                  # no value head to train
                vf_loss, vf_stats = 0.0 * vf_loss, {}
            loss = pg_loss + cfg.vf_coef * vf_loss
            # the losses are means over this process's n tokens. The mean over all processes' N tokens is
            # sum(loss * n) / N, and DDP averages gradients over processes: scaled by n * world / N, the
            # average is that mean's gradient (a scale of 1 in one process)
            n = mb["mask"].sum().item()
            mb_stats, N = global_token_means({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats,
                                              **vf_stats}, n, loss.device)
            kls.append(mb_stats["approx_kl"])                            # KL(pi_old || pi_theta) before this step
            if cfg.target_kl and kls[-1] > cfg.target_kl:               # the KL guard: far enough from pi_old, in
                guard = {"kl_stop": kls[-1]}                             # every process alike: no more steps
                break
            opt.zero_grad(set_to_none=True)
            (loss * (n * world / N)).backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)  # the same in every process
            loss = mb_stats["pg_loss"] + cfg.vf_coef * mb_stats["vf_loss"]  # over all processes: all skip alike
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                bad_steps += 1
                if rank() == 0:
                    print(f"warning: non-finite loss {loss} or gradient norm {grad_norm.item()}: step skipped")
                if bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{bad_steps} non-finite updates in a row; stopping "
                                             "(the last checkpoint is clean)")
                continue
            bad_steps = 0
            opt.step()
            stats.append(mb_stats)
    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
    return dict(mean, steps=len(stats), approx_kl_max=max(kls), **guard), bad_steps  # steps: optimizer steps taken


# ---------------------------------------------------------------------------------------------
# the loop


LOGGED = [("reward", ".3f"), ("kl", ".3f"), ("J", ".3f"), ("gap", ".3f"), ("entropy", ".2f"), ("distinct2", ".2f"),
          ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("vf_loss", ".4f"), ("gap_exact", ".4f"), ("eval_reward", ".3f"),
          ("eval_kl", ".3f"), ("mem_mb", ".0f")]                         # the log line


def train(cfg):
    cfg, device = resolve(cfg), get_device(cfg)
    if "RANK" in os.environ and not dist.is_initialized():              # launched by torchrun: data parallel
        device = init_distributed(cfg, device)
    master = rank() == 0                                                 # it alone prints and writes files
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    resumed = (read_checkpoint(ckpt_path, metrics_path, cfg, RESUME_MAY_CHANGE)
               if cfg.resume and os.path.exists(ckpt_path) else None)
    if not master:
        dist.barrier()                                                   # rank 0 first pre-trains or downloads
    # data: prompts, tokenizer, reward
    enc, prompts, prompt_tokens, reward_fn = load_data(cfg, device)
    eval_prompts = ((data.load_prompts(cfg.eval_prompts) if cfg.eval_prompts else [] if cfg.prompts
                     else data.task_eval_prompts()) if cfg.eval_every else [])  # held out: never trained on
    eval_tokens = [enc.encode_ordinary(p) for p in eval_prompts]
    config = init_config(cfg, enc)                                       # checked before pre-training or loading
    check_fits(enc, prompt_tokens, cfg.max_new_tokens, config)
    check_fits(enc, eval_tokens, cfg.max_new_tokens, config, "held-out prompt")
    # model: pi_init (frozen) and the policy with its value head; fp32 weights (frozen ones in bf16 in bf16 runs)
    lm = (load_lm(cfg.init, "--init") if cfg.init else pretrain(cfg, enc, device)).to(device)
    if master and dist.is_initialized():
        dist.barrier()                                                   # the others now load pi_init from the cache
    ref_lm = lm.eval().requires_grad_(False)
    jstar, jstar_se = (estimate_jstar(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
                       if cfg.jstar_samples else (None, None))
    space = (response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc) if cfg.exact_every else None)
    torch.manual_seed(cfg.seed + rank())                                 # each process its own stream
    policy, ref_lm = make_policy(cfg, lm, enc.n_vocab, device)         # with LoRA: pi_init = adapters off
    opt = make_optimizer(policy, cfg.lr, device)

    os.makedirs(cfg.out_dir, exist_ok=True)
    start = 0
    if resumed:
        start = load_checkpoint(resumed, policy, opt, metrics_path, cfg)
        if master:
            print(f"resumed from {ckpt_path} at iteration {start}")
    elif cfg.resume and master:
        print(f"no checkpoint in {cfg.out_dir}: starting afresh")
    model = DDP(policy) if dist.is_initialized() else policy             # DDP averages gradients over processes
    if master:
        size = sum(p.numel() for p in policy.parameters()) / 1e6
        trains = sum(p.numel() for group in opt.param_groups for p in group["params"]) / 1e6  # what Adam steps
        print(f"{cfg.algo} | lambda {cfg.lam} | lr {cfg.lr:g} | " + (f"{size:.2f}M parameters" if not cfg.lora_r else
              f"LoRA r {cfg.lora_r}: {trains:.2f}M of {size:.2f}M parameters train")
              + f" | {len(prompts)} prompts" + (f" ({len(eval_prompts)} held out)" if eval_prompts else "")
              + f" | device {device}" + (f" x {world_size()} processes" if dist.is_initialized() else "")
              + (f" | J* {jstar:.4f} +- {jstar_se:.4f}" if cfg.jstar_samples else "")
              + (f" | exact evaluation of {space['rewards'].numel()} responses" if space else ""))

    bad_steps, history = 0, []
    for it in range(start, cfg.iters):
        exact = (exact_eval(policy.lm, space, cfg.lam) if space and master and (it == 0 or (it + 1) % cfg.exact_every == 0)
                 else {})                                                # of pi_old, the policy that samples next
        held_out = (evaluate(cfg, policy, ref_lm, eval_tokens, eval_prompts, reward_fn, enc, device, it)
                    if eval_prompts and master and (it == 0 or (it + 1) % cfg.eval_every == 0) else {})
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch, P, stats, samples = rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
        update_stats, bad_steps = update(cfg, model, opt, batch, P, bad_steps)
        stats.update(update_stats, iter=it + 1, samples=(it + 1) * cfg.batch_size, ms=1000 * (time.time() - t0),
                     mem_mb=peak_memory_mb(device))
        if cfg.jstar_samples:
            stats.update(gap=jstar - stats["J"], jstar=jstar, jstar_se=jstar_se)
        stats.update(exact, **held_out)
        history.append(stats)
        if master:
            if it == 0:                                                  # a fresh run has results of its own:
                keep_previous_run(cfg.out_dir)                           # an earlier run's move aside
            with open(metrics_path, "a" if it > 0 else "w") as f:       # a fresh run starts a fresh file
                f.write(json.dumps(stats) + "\n")
            if it == 0:                                                  # what made metrics.jsonl (compare.py --plot)
                write_config(os.path.join(cfg.out_dir, "config.json"), cfg)
            print(f"iter {it + 1}/{cfg.iters} | " + " | ".join(f"{k} {stats[k]:{fmt}}" for k, fmt in LOGGED if k in stats)
                  + (f" | target_kl: stopped at approx_kl {stats['kl_stop']:.3f} after {stats['steps']}/"
                     f"{cfg.epochs * (cfg.batch_size // cfg.minibatch_size)} steps" if "kl_stop" in stats else "")
                  + f" | {stats['ms']:.0f}ms")
            if cfg.sample_every and (it + 1) % cfg.sample_every == 0:
                for prompt, completion, score, kl in samples[:4]:
                    print(f"    {prompt!r} -> {completion!r} | reward {score:+.2f} | kl {kl:.2f}")
        if (cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0) or it + 1 == cfg.iters:
            save_checkpoint(ckpt_path, policy, opt, it + 1, cfg, json.dumps(stats))  # in every process (RNG states)
    if master:
        lm = policy.lm
        with quiet():                                                    # no progress bar in the log
            if cfg.lora_r:                                               # the adapters alone (peft), then merged
                lm.save_pretrained(os.path.join(cfg.out_dir, "policy", "adapter"))
                lm = lm.merge_and_unload()                               # into a plain model: from_pretrained loads it
            lm.save_pretrained(os.path.join(cfg.out_dir, "policy"))
            if isinstance(enc, data.HFTokenizer):                        # from_pretrained finds the tokenizer too
                enc.tok.save_pretrained(os.path.join(cfg.out_dir, "policy"))
        torch.save(policy.v_head.state_dict(), os.path.join(cfg.out_dir, "policy", "value_head.pt"))
        write_config(os.path.join(cfg.out_dir, "policy", "apa_config.json"), cfg)  # its tokenizer and reward (--sample)
    if dist.is_initialized():                                            # every process here, rank 0 done writing,
        dist.barrier()                                                   # then the DDP wrapper before its group
        del model
        dist.destroy_process_group()
    return history


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback);
    Ctrl-C ends with status 130 and says how to resume."""
    cfg = None

    def interrupted():
        ckpt_path = cfg and os.path.join(cfg.out_dir, "ckpt.pt")
        return "interrupted: " + (f"{ckpt_path} is intact; the same command with --resume=1 continues from it"
                                  if ckpt_path and os.path.exists(ckpt_path) else "no checkpoint yet, nothing to resume")
    with one_line_errors(interrupted):
        cfg = parse_args(Config, sys.argv[1:] if argv is None else argv, __doc__)
        validate(cfg)
        if cfg.sample:
            return sample_policy(cfg, Config)
        with exclusive(cfg.out_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            return train(cfg)                                            # (torchrun: rank 0 holds the lock)


if __name__ == "__main__":
    main()
