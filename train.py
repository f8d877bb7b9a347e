"""
RLHF of a small GPT with APA, PPO, AWR, GRPO or RLOO, in one loop: sample, score, estimate advantages, update.
The algorithms differ only in their advantages and policy loss (apa.py, ppo.py, grpo.py); the policy and its
sampler are in model.py, the task and its reward in data.py, J* and the held-out evaluation in evaluation.py.
What is not the algorithm (checks, the run folder and resume, Hugging Face checkpoints, LoRA, the GPU sampler, the
exact evaluator, data parallel) is in lab/: this file alone wires it in, each call where it happens.

Paper: Zhu et al. 2023, "Fine-Tuning Language Models with Advantage-Induced Policy Alignment", arXiv 2306.02231.
Run: python train.py                          APA on the embedded task, a few minutes on a CPU
     python train.py --algo=ppo --lam=0.2     any field of Config as --key=value (--help lists them)
     torchrun --nproc_per_node=N train.py     data parallel over N GPUs (docs/scale.md)

Where this departs from the paper and the authors' code (docs/theory.md explains each point):
1. APA's target is anchored on pi_old and the reward carries the per-token KL penalty, so the loss's fixed
   point is exactly pi* = pi_init exp(R/lambda) / Z. --apa_form=paper gives the paper's literal loss, and
   --apa_form=authors the configuration of the authors' code: that loss with its advantages whitened.
2. One lambda is APA's temperature (the authors' adv_coeff_sq is 1/lambda) and the reward's KL coefficient,
   so that every algorithm aims at the same pi*. Only PPO (and APA with --apa_form=authors) whitens its advantages.
3. The policy and the value head share one network (a linear head on the last hidden state), as in trlx.
4. pi_init is a tiny GPT pre-trained here, and the reward counts words (--init, --reward_model, --reward_fn
   and --prompts take real ones).
5. A KL guard stops an update once a minibatch's approx_kl exceeds target_kl (rarely in the default run: docs/gpu.md).
"""
import functools
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from apa import apa_loss, awr_loss
from data import call_reward, distinct_n, load_eval_prompts, load_reward_fn, load_train_prompts
from evaluation import estimate_jstar, evaluate
from grpo import CRITIC_FREE, KL_ESTIMATORS, group_advantages, grpo_loss, rloo_advantages
from lab import checks, cli, ddp, hf, lora, runs, static_sampler
from lab.ddp import gather_all, global_mean, rank, world_size
from lab.exact import exact_eval, response_space
from model import (autocast, entropy, get_device, lm_forward, make_optimizer, peak_memory_mb, sample,
                   set_cpu_threads, token_logprobs)
from ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, value_loss

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # --- algorithm
    algo: Literal["apa", "ppo", "awr", "grpo", "rloo"] = "apa"  # apa.py (APA, AWR), ppo.py (PPO), grpo.py (GRPO, RLOO)
    apa_form: Literal["exact", "paper", "authors"] = "exact"  # exact: pi_old anchor, KL in the reward (fixed point
                                   # pi*); paper: pi_init anchor, no KL in the reward (the paper's literal loss);
                                   # authors: paper, with the advantages whitened per batch (the authors' code)
    apa_clip: float = 0.0          # bounded APA: Adv/lambda clipped to [-c, c] in APA's target (0: unbounded)
    group_size: int | None = None  # k responses per prompt, in a row; default 4 for grpo and rloo (k >= 2), else 1
    grpo_std: bool = True          # GRPO divides its advantages by the group's std (0: Dr. GRPO, it does not)
    kl: Literal["auto", "reward", "k1", "k2", "k3", "k3_is"] = "auto"  # GRPO and RLOO: the KL to pi_init in the
                                   # sequence reward, or in the loss by this estimator; auto: k3 (grpo), reward (rloo)
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
    lr: float | None = None        # Adam's learning rate; default 3e-5 on the tiny GPT, 1e-6 with --init (docs/gpu.md)
    target_kl: float = 0.2         # the KL guard: an update stops once a minibatch's approx_kl exceeds it (0: never)
    max_grad_norm: float = 1.0     # gradient clipping
    max_bad_steps: int = 3         # stop after this many non-finite losses or gradients in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    threads: int = 0               # torch's threads on a CPU after pre-training; 0: one for the tiny GPT, else torch's
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # bf16 autocast of forward passes; auto: bf16 on cuda only
    cuda_graph: bool = False       # on a GPU, sample 8 tokens per CUDA graph replay (opt-in: docs/gpu.md)
    # --- data and models
    prompts: str = ""              # prompts file (.txt, one a line; .jsonl, {"prompt": ...}); empty: the embedded task
    eval_prompts: str = ""         # held-out prompts file, never trained on; empty: the task's held-out openings
    reward_fn: str = "data:sentiment_reward"  # 'module:function' (prompts, completions) -> floats
    reward_model: str = ""         # Hugging Face sequence-classification model (path or id); replaces reward_fn
    evaluator: str = ""            # a second reward model (path or id), fitted to other pairs: the paper's evaluator,
                                   # never trained on, logged as `evaluator` and `eval_evaluator` beside the judge's
    gold_fn: str = ""              # the judge, never trained on: 'module:function' as reward_fn; empty: the task's
                                   # reward where a --reward_model is trained against on the embedded task, else none
    init: str = ""                 # Hugging Face causal LM (path or id) as pi_init; empty: pre-train a tiny GPT
    tokenizer: str = ""            # "task", "gpt2" or a Hugging Face one (path or id); empty: --init's own, or "task"
    max_new_tokens: int = 20       # response length limit (the task's reviews take at most 18)
    lora_r: int = 0                # LoRA's rank (0: off; needs peft): only adapters train, pi_init is them switched off
    lora_alpha: float = 16.0       # LoRA's scale alpha / r
    lora_targets: str = "all"      # modules with adapters: all (every linear layer and the LM head), or names (c_attn)
    grad_checkpointing: bool = False  # recompute each layer's activations in the backward pass: less memory, slower
    n_layer: int = 2               # layers of the tiny GPT
    n_head: int = 4                # attention heads of the tiny GPT
    n_embd: int = 128              # width of the tiny GPT
    block_size: int = 64           # context window of the tiny GPT
    sft_steps: int = 300           # pre-training steps of the tiny GPT on the task corpus (cached)
    sft_lr: float = 1e-3           # pre-training learning rate
    # --- output
    out_dir: str = "out"           # metrics.jsonl, config.json, ckpt.pt, policy/
    sft_dir: str = "out/sft"       # cache of the pre-trained tiny GPT
    sample_every: int = 50         # print decoded samples every N iterations (0: never)
    ckpt_every: int = 50           # checkpoint every N iterations (0: only at the end)
    resume: bool = False           # continue from out_dir/ckpt.pt
    eval_every: int = 25           # held-out evaluation (eval_reward, eval_kl, eval_J) every N iterations (0: never)
    eval_samples: int = 128        # responses per held-out evaluation
    jstar_samples: int = 256       # samples per prompt from pi_init to estimate J* (0: skip)
    exact_every: int = 10          # exact gap every N iterations (0: never), where responses are few (lab/exact.py)
    # --- sampling from a trained policy
    sample: str = ""               # a trained policy's folder (out/policy): print completions with their reward, exit
    prompt: str = ""               # the prompt to complete with --sample; empty: the task prompts in turn
    num_samples: int = 4           # completions printed by --sample


def resolve(cfg):
    """The config with the defaults that depend on other fields filled in: the learning rate, k, GRPO's and RLOO's
    place for the KL, and the judge (the task's own reward, where a learned reward model stands in for it)."""
    return replace(cfg, lr=cfg.lr if cfg.lr is not None else 1e-6 if cfg.init else 3e-5,
                   group_size=cfg.group_size if cfg.group_size is not None else 4 if cfg.algo in CRITIC_FREE else 1,
                   kl={"grpo": "k3", "rloo": "reward"}.get(cfg.algo, "auto") if cfg.kl == "auto" else cfg.kl,
                   gold_fn=cfg.gold_fn or ("data:sentiment_reward" if cfg.reward_model and not cfg.prompts else ""))


# ---------------------------------------------------------------------------------------------
# rollout: generate, score, and everything the update needs


def make_sampler(cfg, enc, device):
    """The run's sampler, chosen once: sampler(lm, idx, prompt_tokens) is model.sample with the run's config, tokenizer
    and device bound, and its generate function: model.generate's eager loop, or on a GPU with --cuda_graph=1
    lab/static_sampler.py's CUDA graph."""
    generate = static_sampler.choose_sampler(cfg, device)
    return functools.partial(sample, cfg, enc=enc, device=device, generate=generate)


@torch.no_grad()
def rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, sampler, gold_fn=None, evaluator_fn=None):
    """One batch of the run, drawn with sampler (make_sampler). Returns the batch that the update needs, the prompts'
    padded length P, statistics and samples."""
    # 1. generate: prompts (this process's share, each k times in a row), responses from pi_old, their text
    k = cfg.group_size
    idx = torch.randint(len(prompts), (cfg.batch_size // world_size() // k,)).repeat_interleave(k).tolist()
    prompt_ids, prompt_mask, response, mask, _, completions = sampler(policy.lm, idx, prompt_tokens)
    device = response.device
    # 2. score: the reward of each completion (and the judge's and the evaluator's scores, which training never sees)
    batch_prompts = [prompts[i] for i in idx]
    scores = call_reward(cfg, reward_fn, batch_prompts, completions).to(device)  # (B,)
    gold = (call_reward(cfg, gold_fn, batch_prompts, completions, f"gold function {cfg.gold_fn}").to(device)
            if gold_fn else None)                                        # (B,) the judge's scores, or None
    evaluator = (call_reward(cfg, evaluator_fn, batch_prompts, completions, f"evaluator {cfg.evaluator}").to(device)
                 if evaluator_fn else None)                              # (B,) the evaluator model's scores, or None
    input_ids = torch.cat([prompt_ids, response], 1)                     # (B, P + T)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)  # (B, P + T)
    P = prompt_ids.shape[1]
    # 3. log-probs under pi_old and pi_init, values (one set of (B, T, V) logits alive at a time)
    critic = cfg.algo not in CRITIC_FREE                                 # GRPO and RLOO have no use for values
    with autocast(cfg, device):
        logits, values = policy(input_ids, attention_mask, P, critic)    # (B, T, V), (B, T) or None
    logprobs = token_logprobs(logits, response)                          # (B, T) log pi_old
    entropies = entropy(logits)                                          # (B, T)
    del logits
    with autocast(cfg, device):
        ref_logits, _ = lm_forward(ref_lm, input_ids, attention_mask, P, policy.n_vocab)  # (B, T, V): the tokenizer's V
    ref_logprobs = token_logprobs(ref_logits, response)                  # (B, T) log pi_init
    del ref_logits
    # 4. rewards and advantages: per-token rewards with the KL penalty, then GAE (the paper's literal APA and the
    # authors' configuration: no KL in the reward; PPO and the authors' APA whiten); GRPO and RLOO: one advantage per
    # response, from its group's sequence rewards
    seq_kl = ((logprobs - ref_logprobs) * mask).sum(1)                   # (B,) sequence KL estimate
    if critic:
        kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form != "exact" else cfg.lam
        rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)  # (B, T)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
        if cfg.algo == "ppo" or (cfg.algo == "apa" and cfg.apa_form == "authors"):
            advantages = masked_whiten(advantages, mask, mean_fn=global_mean)  # mean and variance over all processes
    else:
        score = scores - cfg.lam * seq_kl if cfg.kl == "reward" else scores  # (B,) R - lambda KL, or R (KL in the loss)
        advantages = mask * (group_advantages(score, k, cfg.grpo_std) if cfg.algo == "grpo"
                             else rloo_advantages(score, k))[:, None]   # (B, T)
    stats = {"reward": global_mean(scores).item(), "kl": global_mean(seq_kl).item(),   # over all processes
             "J": global_mean(scores - cfg.lam * seq_kl).item(),
             "entropy": global_mean(entropies, mask).item(),
             "distinct2": distinct_n(gather_all(completions), 2), "length": global_mean(mask.sum(1)).item(),
             **({"gold": global_mean(gold).item()} if gold_fn else {}),
             **({"evaluator": global_mean(evaluator).item()} if evaluator_fn else {})}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 logprobs=logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                 **(dict(values=values, returns=returns) if critic else {}))
    samples = list(zip(batch_prompts, completions, scores.tolist(), seq_kl.tolist()))
    return batch, P, stats, samples


# ---------------------------------------------------------------------------------------------
# update: several epochs of minibatches; the algorithms differ only in the policy loss; the KL guard
# (target_kl) stops it once a minibatch has moved too far from pi_old


def policy_loss(cfg, logprobs, mb):
    """The policy loss of the run's algorithm on a minibatch mb, with logprobs (b, T) under pi_theta: one branch per
    loss. GRPO and RLOO share GRPO's clipped loss; only their advantages differ (rollout). Returns (pg_loss, stats)."""
    kl_in_loss = KL_ESTIMATORS.get(cfg.kl)  # GRPO, RLOO: the KL to pi_init as a loss term; None: in the reward (rollout)
    if cfg.algo == "apa":                                                # the paper's form anchors on pi_init
        ref = mb["ref_logprobs"] if cfg.apa_form != "exact" else None
        return apa_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.lam, ref, cfg.apa_clip)
    if cfg.algo == "ppo":
        return ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.cliprange)
    if cfg.algo == "awr":
        return awr_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.awr_lam, cfg.awr_max_weight)
    if cfg.algo in CRITIC_FREE:                                          # grpo, rloo
        return grpo_loss(logprobs, mb["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["mask"], cfg.lam,
                         cfg.cliprange, kl_in_loss)
    raise ValueError(f"algo {cfg.algo!r} has no policy loss")


def update(cfg, policy, opt, batch, P, bad_steps=None):
    """Epochs of minibatch steps on one rollout's batch. bad_steps (lab/checks.py's BadSteps) counts non-finite steps
    across iterations (None: a fresh count). Returns the statistics, averaged over the steps taken."""
    bad_steps = bad_steps or checks.BadSteps(cfg.max_bad_steps)
    B = cfg.batch_size // world_size()                                   # this process's share
    critic = cfg.algo not in CRITIC_FREE                                 # a value head to train?
    stats, kls, guard = [], [], {}
    for _ in range(cfg.epochs):
        if guard:
            break
        for mb_inds in torch.randperm(B).split(cfg.minibatch_size // world_size()):
            mb = {k: v[mb_inds.to(v.device)] for k, v in batch.items()}
            with autocast(cfg, mb["response"].device):
                logits, values = policy(mb["input_ids"], mb["attention_mask"], P, critic)  # (b, T, V), (b, T)
            logprobs = token_logprobs(logits, mb["response"])            # (b, T) log pi_theta
            pg_loss, pg_stats = policy_loss(cfg, logprobs, mb)           # ()
            vf_loss, vf_stats = (value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.cliprange_value)
                                 if critic else (torch.zeros(()), {}))  # GRPO and RLOO: no value head to train
            loss = pg_loss + cfg.vf_coef * vf_loss                       # ()
            mb_stats, scale = ddp.token_means({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats,
                                               **vf_stats}, mb["mask"])  # over all processes' tokens
            kls.append(mb_stats["approx_kl"])                            # KL(pi_old || pi_theta) before this step
            if cfg.target_kl and kls[-1] > cfg.target_kl:               # the KL guard: far enough from pi_old, in
                guard = {"kl_stop": kls[-1]}                             # every process alike: no more steps
                break
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()                                    # scale: 1 in one process (lab/ddp.py)
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)  # the same in every process
            if bad_steps.skip(mb_stats["pg_loss"] + cfg.vf_coef * mb_stats["vf_loss"], grad_norm):  # non-finite
                continue
            opt.step()
            stats.append(mb_stats)
    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
    return dict(mean, steps=len(stats), approx_kl_max=max(kls), **guard)  # steps: optimizer steps taken


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg, known=None):
    """The RL loop; returns every iteration's statistics. known: a dict of what depends only on pi_init, the data and
    lambda, J* ("jstar": value and standard error) and the exact evaluator's responses ("space"): what it lacks is
    computed here and added, so that runs which share them compute them once (experiments/compare.py)."""
    cfg = resolve(cfg)
    device = ddp.setup(cfg, get_device(cfg))                             # under torchrun: join its processes
    master = rank() == 0                                                 # it alone prints and writes files
    resumed = runs.checkpoint_to_resume(cfg, resolve)                    # --resume: checked before any work
    with ddp.rank_zero_first():                                          # it builds pi_init, the others read its cache
        enc = hf.load_tokenizer(cfg)                                     # the task's, GPT-2's, or --init's own
        prompts, prompt_tokens = load_train_prompts(cfg, enc)
        reward_fn = (hf.reward_model_fn(cfg.reward_model, enc, device) if cfg.reward_model  # a model, or a function
                     else load_reward_fn(cfg.reward_fn))
        gold_fn = load_reward_fn(cfg.gold_fn, "gold function") if cfg.gold_fn else None  # the judge
        evaluator_fn = hf.reward_model_fn(cfg.evaluator, enc, device) if cfg.evaluator else None  # the paper's judge
        eval_prompts, eval_tokens = load_eval_prompts(cfg, enc)          # held out: never trained on
        ref_lm = runs.load_pi_init(cfg, enc, prompt_tokens, eval_tokens, device)  # --init, or the tiny GPT (cached)
    set_cpu_threads(cfg, device)                                         # the tiny GPT: one thread (docs/models.md)
    sampler = make_sampler(cfg, enc, device)                             # the eager loop, or a CUDA graph: chosen once
    known = {} if known is None else known
    if cfg.jstar_samples and "jstar" not in known:
        known["jstar"] = estimate_jstar(cfg, ref_lm, prompt_tokens, prompts, reward_fn, sampler)
        static_sampler.DECODERS.clear()                                  # a GPU's decoders of 512 rows: not needed again
    if cfg.exact_every and "space" not in known:
        known["space"] = response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc, gold_fn)
    jstar = known.get("jstar") if cfg.jstar_samples else None
    space = known.get("space") if cfg.exact_every else None
    torch.manual_seed(cfg.seed + rank())                                 # each process its own stream
    policy, ref_lm = lora.make_policy(cfg, ref_lm, enc.n_vocab, device)  # a trainable copy of pi_init, value head
    opt = make_optimizer(policy, cfg.lr, device)
    start = runs.resume(resumed, policy, opt, cfg)                       # 0 for a fresh run
    model = DDP(policy) if dist.is_initialized() else policy             # DDP averages gradients over processes
    if master:
        print(cli.header(cfg, policy, opt, prompts, eval_prompts, device, jstar, space))

    bad_steps, history = checks.BadSteps(cfg.max_bad_steps), []          # non-finite steps in a row stop the run
    same_rewards = checks.SameRewards(cfg)                               # a reward that tells nothing: one warning
    for it in range(start, cfg.iters):
        exact = (exact_eval(policy.lm, space, cfg.lam) if space and master and (it == 0 or (it + 1) % cfg.exact_every == 0)
                 else {})                                                # of pi_old, the policy that samples next
        held_out = (evaluate(cfg, policy, ref_lm, eval_tokens, eval_prompts, reward_fn, sampler, it, gold_fn,
                             evaluator_fn)
                    if eval_prompts and master and (it == 0 or (it + 1) % cfg.eval_every == 0) else {})
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch, P, stats, samples = rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, sampler, gold_fn,
                                           evaluator_fn)
        same_rewards.check(samples)
        stats.update(update(cfg, model, opt, batch, P, bad_steps))
        stats.update(iter=it + 1, samples=(it + 1) * cfg.batch_size, ms=1000 * (time.time() - t0),
                     mem_mb=peak_memory_mb(device))
        if jstar:
            stats.update(gap=jstar[0] - stats["J"], jstar=jstar[0], jstar_se=jstar[1])
        stats.update(exact, **held_out)
        history.append(stats)
        if master:
            runs.append_metrics(cfg, stats)                              # out_dir/metrics.jsonl
            print(cli.log_line(cfg, stats, samples))                     # iter 1/300 | reward ... | 470ms
        if (cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0) or it + 1 == cfg.iters:
            runs.save_checkpoint(cfg, policy, opt, it + 1, json.dumps(stats))  # every process: its random state
    if master:
        runs.save_policy(cfg, policy, enc)                               # out_dir/policy, a Hugging Face folder
    del model                                                            # the DDP wrapper before its process group
    ddp.finish()
    return history


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback);
    Ctrl-C ends with status 130 and says how to resume."""
    cfg = None
    with cli.one_line_errors(lambda: runs.interrupted(cfg)):
        cfg = resolve(cli.parse_args(Config, sys.argv[1:] if argv is None else argv, __doc__))
        checks.validate(cfg)
        if cfg.sample:
            return runs.sample_policy(cfg, Config)
        with runs.exclusive(cfg.out_dir):                                # one run at a time in out_dir
            return train(cfg)


if __name__ == "__main__":
    main()
