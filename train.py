"""
RLHF of a small GPT with APA, PPO or AWR, in one readable loop: sample, score, estimate values and
advantages, update. The three share everything but the policy loss (apa.py, ppo.py).

Paper: Zhu et al. 2023, "Fine-Tuning Language Models with Advantage-Induced Policy Alignment",
arXiv 2306.02231. Run: python train.py  (APA on the embedded task, a few minutes on a CPU)
          python train.py --algo=ppo --iters=100 --lam=0.2   (any field of Config as --key=value)
          python compare.py   (APA, PPO and AWR over seeds and learning rates: compare.py)
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
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import fcntl
import inspect
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import data
from apa import apa_loss, awr_loss
from ppo import gae, kl_penalized_rewards, masked_mean, masked_whiten, ppo_policy_loss, value_loss

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # --- algorithm
    algo: Literal["apa", "ppo", "awr"] = "apa"  # the policy loss: APA (apa.py: apa_loss), PPO (ppo.py) or AWR (apa.py: awr_loss)
    apa_form: Literal["exact", "paper"] = "exact"  # exact: pi_old anchor, KL in the reward (fixed point pi*);
                                   # paper: pi_init anchor, no KL in the reward (the paper's literal loss)
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
    lr: float = 3e-5               # Adam learning rate for the RL updates (APA diverged at 1e-4: README)
    max_grad_norm: float = 1.0     # gradient clipping
    max_bad_steps: int = 3         # stop after this many non-finite losses or gradients in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # bf16 autocast for the forward passes (logits, log-probs,
                                   # values and losses stay fp32); auto: bf16 on cuda, fp32 on cpu
    # --- data and models
    prompts: str = ""              # prompts file (.txt, one a line; .jsonl, {"prompt": ...}); empty: the embedded task
    reward_fn: str = "data:sentiment_reward"  # 'module:function' (prompts, completions) -> floats
    reward_model: str = ""         # Hugging Face sequence-classification model (path or id); replaces reward_fn
    init: str = ""                 # Hugging Face causal LM (path or id) as pi_init; empty: pre-train a tiny GPT
    tokenizer: str = ""            # "task", "gpt2" (tiktoken) or a Hugging Face tokenizer (path or id); empty: the
                                   # --init checkpoint's own (GPT-2's BPE if it ships none), else "task"
    max_new_tokens: int = 20       # response length limit (the task's reviews take at most 18)
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
    jstar_samples: int = 256       # samples per prompt from pi_init to estimate J* (0: skip)
    exact_every: int = 10          # J, J* and the gap computed exactly, by enumerating every response, every N
                                   # iterations (0: never); only runs when that is at most EXACT_LIMIT responses
                                   # in all, e.g. --max_new_tokens=2 on the task (not at the default 20)
    # --- sampling from a trained policy
    sample: str = ""               # a trained policy's folder (out/policy): print completions with their reward, then exit
    prompt: str = ""               # the prompt to complete with --sample; empty: the first task prompts
    num_samples: int = 4           # completions printed by --sample


class ArgumentError(ValueError):
    """A bad command line; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):                                            # argparse would print usage and exit 2
        raise ArgumentError(message)


def parse_args(cls, argv, doc=""):
    """An instance of the dataclass `cls` from flags, with argparse: every field is a flag, `--name value`
    or `--name=value`; the comment after a field is its help text, `# --- name` comments group the flags;
    a Literal type gives the choices; a bool is a bare flag (`--resume`) or takes true/false/1/0."""
    helps, groups, name = {}, {}, None
    for line in inspect.getsource(cls).splitlines():                      # the comments of the class body
        field = re.match(r"\s+(\w+): .*? = .*?(?:#\s*(.*))?$", line)
        comment = re.match(r"\s+#\s*(---\s*)?(.*)$", line)
        if field:
            name, helps[field[1]] = field[1], field[2] or ""
        elif comment and comment[1]:
            groups[comment[2]] = []
        elif comment and name:
            helps[name] += " " + comment[2]                              # a continued comment
        if field and groups:
            groups[list(groups)[-1]].append(field[1])
    parser = Parser(description=doc, allow_abbrev=False, formatter_class=HelpFormatter,
                    usage="%(prog)s [--flag value | --flag=value | --bool_flag] ...")
    for title, names in (groups or {"flags": [f.name for f in dataclasses.fields(cls)]}).items():
        group = parser.add_argument_group(title)
        for f in (f for f in dataclasses.fields(cls) if f.name in names):
            kind = dict(type=f.type, metavar=f.type.__name__.upper())
            if typing.get_origin(f.type) is Literal:
                kind = dict(type=type(f.type.__args__[0]), choices=f.type.__args__)
            elif f.type is bool:
                kind = dict(type=parse_bool, nargs="?", const=True, metavar="true|false")
            group.add_argument(f"--{f.name}", default=f.default, help=helps.get(f.name) or " ", **kind)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag, [f"--{f.name}" for f in dataclasses.fields(cls)], n=1)
        raise ArgumentError(f"unknown argument {unknown[0]!r}" + (f": did you mean {close[0]}?" if close else
                                                                 " (--help lists the flags)"))
    return cls(**vars(args))


def parse_bool(text):
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""


def validate(cfg):
    """Refuse settings that mean nothing, saying why, before anything is read or written."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
    rules = [  # (field, holds, what it must be)
        ("lam", cfg.lam > 0, "> 0"),
        ("awr_lam", cfg.awr_lam > 0, "> 0 (AWR's temperature)"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("iters", cfg.iters > 0, "> 0"),
        ("batch_size", cfg.batch_size > 0, "> 0"),
        ("minibatch_size", cfg.minibatch_size > 0, "> 0"),
        ("epochs", cfg.epochs > 0, "> 0 (passes over each rollout)"),
        ("max_new_tokens", cfg.max_new_tokens > 0, "> 0 (a response has at least one token)"),
        ("lr", 0 <= cfg.lr <= 0.1, "in [0, 0.1]: Adam moves every weight by about lr a step, so more wrecks a "
                                   "language model in a few steps (1e-6 to 1e-3 are usual)"),
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
        ("out_dir", cfg.out_dir != "", "a folder"),
        ("num_samples", cfg.num_samples > 0, "> 0"),
    ]
    for name, holds, what in rules:
        if not holds:
            raise ValueError(f"{name} must be {what}, got {getattr(cfg, name)!r}")
    if cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by minibatch_size {cfg.minibatch_size}")
    if cfg.prompts and not os.path.exists(cfg.prompts):
        raise ValueError(f"{cfg.prompts} does not exist")
    for path in (cfg.init, cfg.reward_model):                           # a local path, not a hub id ("gpt2", "org/name")
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ValueError(f"{path} does not exist")
    get_device(cfg)


# ---------------------------------------------------------------------------------------------
# model: a causal LM with a scalar value head on its last hidden state


class PolicyWithValue(nn.Module):
    def __init__(self, lm, n_vocab=None):
        super().__init__()
        self.lm, self.n_vocab = lm, n_vocab
        self.v_head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, prompt_len):
        """Logits (B, T, V) and values (B, T) at the states before each response token, both fp32."""
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, prompt_len, self.n_vocab)
        with torch.autocast(hidden.device.type, enabled=False):          # the value head in fp32, even in bf16 runs
            return logits, self.v_head(hidden.float()).squeeze(-1)


def vocab_logits(logits, n_vocab):
    """The logits (..., V) of the tokenizer's V = n_vocab tokens, in fp32. A model's embedding may be padded
    beyond its tokenizer (Pythia: 50,304 rows for 50,277 tokens): the sampler and every log-prob see the
    same V tokens, so that no id decode cannot read is sampled and ratios start at exactly 1."""
    return logits[..., :n_vocab].float()


def lm_forward(lm, input_ids, attention_mask, prompt_len, n_vocab=None):
    """input_ids, attention_mask (B, P + T), prompts left-padded to P. Returns the logits (B, T, V)
    that predict the T response tokens and the last hidden states (B, T, H) at the same positions.
    n_vocab: the tokenizer's vocabulary size (None: all of the model's logits)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)         # (B, P + T) skip left padding
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
    response_states = slice(prompt_len - 1, -1)                         # position t predicts token t + 1
    return vocab_logits(out.logits[:, response_states], n_vocab), out.hidden_states[-1][:, response_states]


def token_logprobs(logits, tokens):
    """log pi(tokens): logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


@torch.no_grad()
def entropy(logits, rows=8):
    """Entropy of each next-token distribution: logits (B, T, V) -> (B, T). Only logged, so it is computed
    a few rows at a time: no (B, T, V) temporaries beside the logits (1.6 GB at B=64, T=128, V=50k)."""
    def chunk(x):                                                        # (rows, T, V) -> (rows, T)
        logp = torch.log_softmax(x, -1)
        return -(logp.exp() * logp).sum(-1)
    return torch.cat([chunk(x) for x in logits.split(rows)])


def left_pad(token_lists, pad_id, device):
    """Token lists -> ids, attention mask, both (B, P), padded on the left."""
    width = max(map(len, token_lists))
    ids = [[pad_id] * (width - len(t)) + t for t in token_lists]
    mask = [[0] * (width - len(t)) + [1] * len(t) for t in token_lists]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, max_new_tokens, eot, n_vocab=None):
    """Sample responses at temperature 1 (no top-k/top-p) with a KV cache, stopping at end-of-text.
    prompt_ids, prompt_mask (B, P), left-padded. Returns response (B, T), mask (B, T) that is 1 up to
    and including the first end-of-text, and the sampler's log-probs (B, T) (0 on padding).
    n_vocab: the tokenizer's vocabulary size; ids beyond it are never sampled (None: all of the model's)."""
    attn = prompt_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                             # (B, P)
    out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)  # (B,)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(vocab_logits(out.logits[:, -1], n_vocab), -1)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1).squeeze(-1)               # (B,)
        tok = torch.where(done, eot, tok)                                # finished rows: padding
        tokens.append(tok)
        logprobs.append(logp.gather(1, tok[:, None]).squeeze(1))         # (B,)
        done |= tok == eot
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)        # (B, P + t)
        pos = pos[:, -1:] + 1                                            # (B, 1)
        out = lm(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, cache=out.cache, use_cache=True)
    response = torch.stack(tokens, 1)                                    # (B, T)
    is_eot = (response == eot).int()                                     # (B, T)
    mask = (is_eot.cumsum(1) - is_eot == 0).float()                      # (B, T) no end-of-text before t
    return response, mask, torch.stack(logprobs, 1) * mask


LAST_STATUS = [0.0]                                                      # when status() last printed a line


def status(text, done=False):
    """Progress of a long step. On a terminal: one line, rewritten in place. In a log: a plain line
    at most every 10 seconds, and always the last one (done=True). Data parallel: rank 0 alone."""
    if rank() != 0:
        return
    if sys.stdout.isatty():
        print("\r\033[K" + text, end="\n" if done else "", flush=True)
    elif done or time.time() - LAST_STATUS[0] >= 10:
        print(text, flush=True)
        LAST_STATUS[0] = time.time()


def tiny_gpt(cfg, vocab_size):
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=vocab_size - 1,
                                      eos_token_id=vocab_size - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def pretrain(cfg, enc, device):
    """pi_init for the embedded task: the tiny GPT trained on the grammar's reviews (next-token loss).
    Cached in cfg.sft_dir, keyed by the tokenizer, the model's shape, the steps and the learning rate."""
    path = os.path.join(cfg.sft_dir, f"{enc.name}_V{enc.n_vocab}_L{cfg.n_layer}_H{cfg.n_head}_D{cfg.n_embd}_"
                                     f"C{cfg.block_size}_S{cfg.sft_steps}_lr{cfg.sft_lr:g}")
    if os.path.isdir(path):
        try:
            lm, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True)
            if not info["missing_keys"]:
                return lm.to(device)
            problem = f"it lacks {info['missing_keys'][0]}"
        except Exception as e:
            problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        print(f"warning: the pi_init cache {path} does not load ({problem}): pre-training it again")
        shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(1234)                                              # the same pi_init for every run seed
    lm = tiny_gpt(cfg, enc.n_vocab).to(device)
    docs = [enc.encode_ordinary(text) + [enc.eot_token] for text in data.task_corpus(20_000)]
    ids = torch.tensor([t for d in docs for t in d], device=device)      # (N,) one stream of reviews
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.sft_steps):
        starts = torch.randint(len(ids) - cfg.block_size - 1, (64,), device=device)
        x = torch.stack([ids[s:s + cfg.block_size] for s in starts])     # (64, C)
        y = torch.stack([ids[s + 1:s + cfg.block_size + 1] for s in starts])
        loss = F.cross_entropy(lm(input_ids=x).logits.flatten(0, 1), y.flatten())
        for g in opt.param_groups:
            g["lr"] = cfg.sft_lr * min(1.0, 2 * (1 - step / cfg.sft_steps))  # flat, then linear decay
        opt.zero_grad()
        loss.backward()
        opt.step()
        status(f"pre-training pi_init: step {step + 1}/{cfg.sft_steps} | loss {loss.item():.3f} | "
               f"{time.time() - t0:.0f}s", done=step + 1 == cfg.sft_steps)
    tmp = f"{path}.tmp{os.getpid()}"                                     # this process's own: runs may build it at once
    try:
        lm.save_pretrained(tmp)
        os.replace(tmp, path)                                            # atomic: the cache is whole or absent
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        if not os.path.isdir(path):                                      # else another run cached it first: use ours
            raise OSError(f"could not write the pi_init cache {path} ({e.strerror or e}): nothing was cached") from e
    return lm


# ---------------------------------------------------------------------------------------------
# data parallel: under torchrun, one process per device, each with its share of every batch. Every
# token-level mean is taken over all processes' tokens, so the algorithm is the one-process one.


def init_distributed(cfg, device):
    """Join torchrun's process group: cuda:LOCAL_RANK with NCCL on GPUs, else the CPU with gloo."""
    world = int(os.environ["WORLD_SIZE"])
    if cfg.batch_size % world or cfg.minibatch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} and minibatch_size {cfg.minibatch_size} must be "
                         f"divisible by the number of processes, {world}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def global_mean(x, mask=None):
    """Mean of x over every process's entries (where mask > 0, weighted by mask). In one process:
    x.mean() or masked_mean(x, mask). Call it under torch.no_grad()."""
    if not dist.is_initialized():
        return x.mean() if mask is None else masked_mean(x, mask)
    mask = torch.ones_like(x) if mask is None else mask
    sums = torch.stack([(x * mask).sum(), mask.sum()])                   # (2,)
    dist.all_reduce(sums)
    return sums[0] / sums[1]


def global_token_means(stats, n, device):
    """Means over this process's n tokens (a dict of floats) -> means over every process's tokens, and
    how many tokens that is. In one process: unchanged, and n."""
    if not dist.is_initialized():
        return stats, n
    sums = torch.tensor([n] + [v * n for v in stats.values()], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return {k: (s / sums[0]).item() for k, s in zip(stats, sums[1:])}, sums[0].item()


def gather_all(items):
    """A list from every process, concatenated in rank order. In one process: the list."""
    if not dist.is_initialized():
        return items
    lists = [None] * dist.get_world_size()
    dist.all_gather_object(lists, items)
    return [x for one in lists for x in one]


# ---------------------------------------------------------------------------------------------
# rollout: sample, score, and everything the update needs


@torch.no_grad()
def sample(cfg, lm, idx, prompt_tokens, prompts, reward_fn, enc, device):
    """Responses to the prompts numbered idx, and their scores. Returns prompt ids and mask (B, P),
    response and its mask (B, T), the decoded completions (end-of-text dropped) and the scores (B,)."""
    prompt_ids, prompt_mask = left_pad([prompt_tokens[i] for i in idx], enc.eot_token, device)  # (B, P)
    with autocast(cfg, device):
        response, mask, _ = generate(lm, prompt_ids, prompt_mask, cfg.max_new_tokens, enc.eot_token, enc.n_vocab)  # (B, T)
    completions = [enc.decode([t for t in r if t != enc.eot_token]) for r in response.tolist()]
    scores = call_reward(cfg, reward_fn, [prompts[i] for i in idx], completions).to(device)  # (B,)
    return prompt_ids, prompt_mask, response, mask, completions, scores


@torch.no_grad()
def rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, enc, device):
    # 1. sample prompts, responses from pi_old, reward-model scores
    idx = torch.randint(len(prompts), (cfg.batch_size // world_size(),)).tolist()  # this process's share
    prompt_ids, prompt_mask, response, mask, completions, scores = sample(
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
        ref_logits, _ = lm_forward(ref_lm, input_ids, attention_mask, P, policy.n_vocab)  # (B, T, V)
    ref_logprobs = token_logprobs(ref_logits, response)                  # (B, T) log pi_init
    del ref_logits
    # 3. per-token rewards with the KL penalty, then GAE (the paper's literal APA: no KL in the reward)
    kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form == "paper" else cfg.lam
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)  # (B, T)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
    if cfg.algo == "ppo":
        advantages = masked_whiten(advantages, mask, mean_fn=global_mean)  # mean and variance over all processes
    kl = ((logprobs - ref_logprobs) * mask).sum(1)                       # (B,) sequence KL estimate
    stats = {"reward": global_mean(scores).item(), "kl": global_mean(kl).item(),   # over all processes
             "J": global_mean(scores - cfg.lam * kl).item(),
             "entropy": global_mean(entropies, mask).item(),
             "distinct2": distinct_n(gather_all(completions), 2), "length": global_mean(mask.sum(1)).item()}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, advantages=advantages,
                 returns=returns)
    samples = list(zip([prompts[i] for i in idx], completions, scores.tolist(), kl.tolist()))
    return batch, P, stats, samples


def call_reward(cfg, reward_fn, prompts, completions):
    """The scores (B,) of the user's reward function or model; whatever goes wrong, one line that names it."""
    name = f"reward model {cfg.reward_model}" if cfg.reward_model else f"reward function {cfg.reward_fn}"
    try:
        scores = reward_fn(prompts, completions)
    except Exception as e:
        raise ValueError(f"{name} raised {type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)") from e
    return check_scores(scores, len(completions), name)


def check_scores(scores, n, name="reward function"):
    if not isinstance(scores, (list, tuple, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} returned a {type(scores).__name__}: expected a list of {n} floats")
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} returned {str(scores)[:80]}: expected a list of {n} floats") from None
    if scores.shape != (n,):
        raise ValueError(f"{name} returned {tuple(scores.shape)} scores for {n} completions")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} returned non-finite scores: {scores[~torch.isfinite(scores)].tolist()[:5]}")
    return scores


def distinct_n(texts, n):
    """Unique n-grams / all n-grams of words and full stops over a batch of texts (Li et al. 2016):
    1.0 when nothing repeats, low under mode collapse."""
    grams = [tuple(w[i:i + n]) for w in (t.replace(".", " .").split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def autocast(cfg, device):
    """bf16 autocast with --precision=bf16 (the default on a GPU; on a CPU too when asked), else nothing.
    Logits are cast to fp32 before any log_softmax, and the value head and the losses run in fp32."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def peak_memory_mb(device):
    """cuda: the most memory tensors held since the last reset (max_memory_allocated). cpu: the process's
    peak resident set size so far (ru_maxrss, in KiB on Linux), which never goes down."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# ---------------------------------------------------------------------------------------------
# update: several epochs of minibatches; APA, PPO and AWR differ only in the policy loss


def update(cfg, policy, opt, batch, P, bad_steps):
    stats, world = [], world_size()
    B = cfg.batch_size // world                                          # this process's share
    for _ in range(cfg.epochs):
        for mb_inds in torch.randperm(B).split(cfg.minibatch_size // world):
            mb = {k: v[mb_inds.to(v.device)] for k, v in batch.items()}
            with autocast(cfg, mb["response"].device):
                logits, values = policy(mb["input_ids"], mb["attention_mask"], P)  # (b, T, V), (b, T)
            logprobs = token_logprobs(logits, mb["response"])            # (b, T) log pi_theta
            if cfg.algo == "apa":
                ref = mb["ref_logprobs"] if cfg.apa_form == "paper" else None
                pg_loss, pg_stats = apa_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.lam, ref)
            elif cfg.algo == "awr":
                pg_loss, pg_stats = awr_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.awr_lam,
                                             cfg.awr_max_weight)
            else:
                pg_loss, pg_stats = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.cliprange)
            vf_loss, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            # the losses are means over this process's n tokens. The mean over all processes' N tokens is
            # sum(loss * n) / N, and DDP averages gradients over processes: scaled by n * world / N, the
            # average is that mean's gradient (a scale of 1 in one process)
            n = mb["mask"].sum().item()
            mb_stats, N = global_token_means({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats,
                                              **vf_stats}, n, loss.device)
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
    return mean, bad_steps


# ---------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def estimate_jstar(cfg, lm, prompt_tokens, prompts, reward_fn, enc, device):
    """J* = E_x[lambda log E_{y ~ pi_init}[exp(R/lambda)]], the best J any policy can reach, from
    jstar_samples samples per prompt, and its standard error (delta method, per prompt)."""
    torch.manual_seed(4321)                                              # the same estimate for every run
    rows, n, t0 = torch.arange(len(prompts)).repeat_interleave(cfg.jstar_samples), cfg.jstar_samples, time.time()
    scores = []
    for chunk in rows.split(512):
        scores.append(sample(cfg, lm, chunk.tolist(), prompt_tokens, prompts, reward_fn, enc, device)[-1])
        k = sum(map(len, scores))
        status(f"estimating J* from pi_init: {k}/{len(rows)} samples | {time.time() - t0:.0f}s", done=k == len(rows))
    scores = torch.cat(scores)                                           # (prompts * n,)
    w = torch.exp(scores.double().cpu() / cfg.lam).view(len(prompts), n)  # (prompts, n) exp(R / lambda)
    jstar_x = cfg.lam * w.mean(1).log()                                  # (prompts,) J*(x)
    se_x = cfg.lam * w.std(1) / (w.mean(1) * math.sqrt(n))               # (prompts,) its standard error
    return jstar_x.mean().item(), (se_x.pow(2).sum().sqrt() / len(prompts)).item()


EXACT_LIMIT = 5_000_000   # the most responses (over all prompts) the exact evaluator enumerates


def n_responses(V, T):
    """How many responses `generate` can return with V tokens and max_new_tokens = T: those ending in
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
def response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc):
    """What the exact evaluator needs that does not depend on the policy, computed once: the score of every
    response to every prompt and its log-prob under pi_init, both (prompts, n). None when the responses are
    more than EXACT_LIMIT in all (then nothing is enumerated)."""
    V, T, eot, t0 = enc.n_vocab, cfg.max_new_tokens, enc.eot_token, time.time()  # generate's V tokens
    if len(prompts) * n_responses(V, T) > EXACT_LIMIT:
        return None
    responses = all_responses(V, T, eot).tolist()                        # (n, T)
    completions = enc.decode_batch([[a for a in r if a != eot] for r in responses])  # as sample() decodes them
    rewards = []
    for i, prompt in enumerate(prompts):
        rewards.append(call_reward(cfg, reward_fn, [prompt] * len(completions), completions))  # (n,)
        status(f"exact evaluation: scoring {len(prompts)} x {len(completions)} responses: {i + 1}/{len(prompts)} | "
               f"{time.time() - t0:.0f}s", done=i + 1 == len(prompts))
    return {"cfg": cfg, "prompt_tokens": prompt_tokens, "max_new_tokens": T, "eot": eot, "V": V,
            "rewards": torch.stack(rewards).double(), "ref_logprobs": response_logprobs(cfg, ref_lm, prompt_tokens, T, eot, V).cpu()}


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
    return {k: v.mean().item() for k, v in stats.items()}


LOGGED = [("reward", ".3f"), ("kl", ".3f"), ("J", ".3f"), ("gap", ".3f"), ("entropy", ".2f"), ("distinct2", ".2f"),
          ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("vf_loss", ".4f"), ("gap_exact", ".4f"), ("mem_mb", ".0f")]  # the log line


def get_device(cfg):
    """auto: cuda if torch sees a GPU, else cpu."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda, but torch finds no CUDA GPU on this machine (use --device=cpu or auto)")
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                        "cpu" if cfg.device == "auto" else cfg.device)


def load_data(cfg, device):
    """The run's tokenizer (with --init: the checkpoint's own), prompts (text and tokens) and reward function."""
    enc = data.get_encoding(cfg.tokenizer or ("task" if not cfg.init else cfg.init if data.ships_tokenizer(cfg.init)
                                              else "gpt2"))
    prompts = data.load_prompts(cfg.prompts) if cfg.prompts else data.task_prompts()
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    reward_fn = (data.reward_model_fn(cfg.reward_model, enc, device) if cfg.reward_model
                 else data.load_reward_fn(cfg.reward_fn))
    return enc, prompts, prompt_tokens, reward_fn


def train(cfg):
    device = get_device(cfg)
    if "RANK" in os.environ and not dist.is_initialized():              # launched by torchrun: data parallel
        device = init_distributed(cfg, device)
    master = rank() == 0                                                 # it alone prints and writes files
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    resumed = read_checkpoint(ckpt_path, metrics_path, cfg) if cfg.resume and os.path.exists(ckpt_path) else None
    if not master:
        dist.barrier()                                                   # rank 0 first pre-trains or downloads
    # data: prompts, tokenizer, reward
    enc, prompts, prompt_tokens, reward_fn = load_data(cfg, device)
    # model: pi_init (frozen) and the policy with its value head
    lm = (AutoModelForCausalLM.from_pretrained(cfg.init, dtype=torch.float32) if cfg.init  # fp32 weights, bf16
          else pretrain(cfg, enc, device)).to(device)                                     # only in autocast
    if master and dist.is_initialized():
        dist.barrier()                                                   # the others now load pi_init from the cache
    context = lm.config.max_position_embeddings
    longest = max(range(len(prompts)), key=lambda i: len(prompt_tokens[i]))
    if len(prompt_tokens[longest]) + cfg.max_new_tokens > context:
        raise ValueError(f"prompt {longest + 1} has {len(prompt_tokens[longest])} tokens: with max_new_tokens="
                         f"{cfg.max_new_tokens} it exceeds the context window of {context}")
    if min(map(len, prompt_tokens)) == 0:
        raise ValueError("a prompt encodes to no token")
    if lm.config.vocab_size < enc.n_vocab:                              # more rows than tokens is fine: masked
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens but the model only {lm.config.vocab_size}")
    eos = lm.config.eos_token_id
    if eos is not None and enc.eot_token not in (eos if isinstance(eos, list) else [eos]):
        raise ValueError(f"tokenizer {enc.name} ends texts with id {enc.eot_token} but the model with {eos}: "
                         "not the model's tokenizer (--tokenizer)")
    ref_lm = lm.eval().requires_grad_(False)
    jstar, jstar_se = (estimate_jstar(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
                       if cfg.jstar_samples else (None, None))
    space = (response_space(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc) if cfg.exact_every else None)
    torch.manual_seed(cfg.seed + rank())                                 # each process its own stream
    policy = PolicyWithValue(copy.deepcopy(ref_lm).requires_grad_(True), enc.n_vocab).to(device).eval()  # no dropout,
    # so the update sees the very policy that sampled (pi_theta = pi_old before the first step)
    nn.init.zeros_(policy.v_head.weight)                                 # V = 0 at the start, for every seed
    nn.init.zeros_(policy.v_head.bias)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)

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
        print(f"{cfg.algo} | lambda {cfg.lam} | {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters | "
              f"{len(prompts)} prompts | device {device}" + (f" x {world_size()} processes" if dist.is_initialized() else "")
              + (f" | J* {jstar:.4f} +- {jstar_se:.4f}" if cfg.jstar_samples else "")
              + (f" | exact evaluation of {space['rewards'].numel()} responses" if space else ""))

    bad_steps, history = 0, []
    for it in range(start, cfg.iters):
        exact = (exact_eval(policy.lm, space, cfg.lam) if space and master and (it == 0 or (it + 1) % cfg.exact_every == 0)
                 else {})                                                # of pi_old, the policy that samples next
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch, P, stats, samples = rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
        update_stats, bad_steps = update(cfg, model, opt, batch, P, bad_steps)
        stats.update(update_stats, iter=it + 1, samples=(it + 1) * cfg.batch_size, ms=1000 * (time.time() - t0),
                     mem_mb=peak_memory_mb(device))
        if cfg.jstar_samples:
            stats.update(gap=jstar - stats["J"], jstar=jstar, jstar_se=jstar_se)
        stats.update(exact)
        history.append(stats)
        if master:
            if it == 0:                                                  # a fresh run has results of its own:
                keep_previous_run(cfg.out_dir)                           # an earlier run's move aside
            with open(metrics_path, "a" if it > 0 else "w") as f:       # a fresh run starts a fresh file
                f.write(json.dumps(stats) + "\n")
            if it == 0:                                                  # what made metrics.jsonl (compare.py --plot)
                write_config(os.path.join(cfg.out_dir, "config.json"), cfg)
            print(f"iter {it + 1}/{cfg.iters} | " + " | ".join(f"{k} {stats[k]:{fmt}}" for k, fmt in LOGGED if k in stats)
                  + f" | {stats['ms']:.0f}ms")
            if cfg.sample_every and (it + 1) % cfg.sample_every == 0:
                for prompt, completion, score, kl in samples[:4]:
                    print(f"    {prompt!r} -> {completion!r} | reward {score:+.2f} | kl {kl:.2f}")
        if (cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0) or it + 1 == cfg.iters:
            save_checkpoint(ckpt_path, policy, opt, it + 1, cfg, json.dumps(stats))  # in every process (RNG states)
    if master:
        policy.lm.save_pretrained(os.path.join(cfg.out_dir, "policy"))
        torch.save(policy.v_head.state_dict(), os.path.join(cfg.out_dir, "policy", "value_head.pt"))
        if isinstance(enc, data.HFTokenizer):                            # from_pretrained finds the tokenizer too
            enc.tok.save_pretrained(os.path.join(cfg.out_dir, "policy"))
        write_config(os.path.join(cfg.out_dir, "policy", "apa_config.json"), cfg)  # its tokenizer and reward (--sample)
    if dist.is_initialized():                                            # every process here, rank 0 done writing,
        dist.barrier()                                                   # then the DDP wrapper before its group
        del model
        dist.destroy_process_group()
    return history


def write_config(path, cfg):
    """The run's config as JSON: beside metrics.jsonl (compare.py --plot reads it) and in policy/ (--sample)."""
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)


@torch.no_grad()
def sample_policy(cfg):
    """`python train.py --sample=out/policy --prompt="the movie was"`: completions of a trained policy with
    their reward, using the tokenizer and reward of its run (read from apa_config.json beside it)."""
    config_path = os.path.join(cfg.sample, "apa_config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{cfg.sample} holds no trained policy ({config_path} is missing)")
    with open(config_path) as f:
        run = Config(**json.load(f))
    if run.init and not run.tokenizer and data.ships_tokenizer(cfg.sample):  # the tokenizer saved beside it
        run = dataclasses.replace(run, init=cfg.sample)
    device = get_device(cfg)
    enc, _, _, reward_fn = load_data(run, device)
    lm = AutoModelForCausalLM.from_pretrained(cfg.sample, dtype=torch.float32).to(device).eval()
    prompts = [cfg.prompt] * cfg.num_samples if cfg.prompt else data.task_prompts()[:cfg.num_samples]
    torch.manual_seed(cfg.seed)
    *_, completions, scores = sample(run, lm, range(len(prompts)), [enc.encode_ordinary(p) for p in prompts],
                                     prompts, reward_fn, enc, device)
    for prompt, completion, score in zip(prompts, completions, scores.tolist()):
        print(f"{prompt!r} -> {completion!r} | reward {score:+.2f}")
    return completions, scores.tolist()


RESUME_MAY_CHANGE = {"iters", "lr", "out_dir", "sft_dir", "sample_every", "ckpt_every", "max_bad_steps", "resume",
                     "device", "precision", "sample", "prompt", "num_samples", "exact_every"}  # any other change mixes two runs


def save_checkpoint(path, policy, opt, iteration, cfg, metrics_line):
    """Everything to continue exactly: weights, optimizer, RNG states, iteration (= lines of metrics.jsonl), the
    config and the last line of metrics.jsonl (to check both on resume). Written to a temporary file, then
    renamed, so a crash or a full disk never leaves a half-written checkpoint. Data parallel: every process
    calls it, rank 0 writes."""
    if not all(torch.isfinite(p).all() for p in policy.parameters()):
        raise FloatingPointError("non-finite weights: checkpoint not written")
    rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"policy": policy.state_dict(), "opt": opt.state_dict(), "iter": iteration, **rng,
             "config": dataclasses.asdict(cfg), "metrics_line": metrics_line}
    if dist.is_initialized():
        state["ranks_rng"] = gather_all([rng])                           # every process's, in rank order
    if rank() != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "there is no earlier checkpoint"
        raise OSError(f"could not write checkpoint {path} at iteration {iteration} ({e.strerror or e}): {kept}") from e


def read_checkpoint(path, metrics_path, cfg):
    """The checkpoint to resume from, after checking that it is whole, that the config keeps what the run
    depends on, and that metrics.jsonl holds exactly the checkpoint's iterations (later lines are dropped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        iteration, saved, last_line = state["iter"], state["config"], state["metrics_line"]
    except Exception as e:
        raise ValueError(f"{path} is damaged or not a checkpoint of this train.py ({type(e).__name__}: {e}); "
                         "a run without --resume starts afresh and keeps it in previous/") from None
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != v]
    if changed:
        raise ValueError(f"--resume would mix two runs: {', '.join(changed)} (a resumed run may change only "
                         f"{', '.join(sorted(RESUME_MAY_CHANGE))})")
    if iteration > cfg.iters:
        raise ValueError(f"{path} is at iteration {iteration}, past --iters={cfg.iters}")
    try:
        with open(metrics_path) as f:
            lines = [line.rstrip("\n") for line in f][:iteration]
    except FileNotFoundError:
        lines = []
    for i, line in enumerate(lines, 1):
        try:
            ok = json.loads(line)["iter"] == i
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"{metrics_path} line {i} is not the metrics of iteration {i}: it does not match {path}")
    if len(lines) < iteration or lines[-1] != last_line:
        raise ValueError(f"{metrics_path} does not match {path} (iteration {iteration}): " +
                         (f"it has {len(lines)} lines" if len(lines) < iteration else f"line {iteration} differs"))
    state["metrics_lines"] = lines
    return state


def load_checkpoint(state, policy, opt, metrics_path, cfg):
    """Continue from a checkpoint that read_checkpoint accepted; cut metrics.jsonl back to its iteration."""
    try:
        policy.load_state_dict(state["policy"])
    except RuntimeError as e:
        problem = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e))
        raise ValueError(f"the checkpoint does not fit this model: {problem}") from None
    opt.load_state_dict(state["opt"])
    if state["config"]["lr"] != cfg.lr:                                  # allowed: the new lr applies from here on
        for group in opt.param_groups:
            group["lr"] = cfg.lr
        if rank() == 0:
            print(f"lr changed from {state['config']['lr']:g} to {cfg.lr:g}")
    rngs = state.get("ranks_rng", [state])                               # each process continues its own stream
    if len(rngs) != world_size():
        raise ValueError(f"the checkpoint was written by {len(rngs)} processes: resume with as many")
    torch.set_rng_state(rngs[rank()]["rng"])
    if rngs[rank()]["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs[rank()]["cuda_rng"])
    if rank() != 0:
        return state["iter"]
    tmp = f"{metrics_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in state["metrics_lines"])
    os.replace(tmp, metrics_path)
    return state["iter"]


def keep_previous_run(out_dir):
    """A fresh run moves an earlier run's results into out_dir/previous/N (N = 1, 2, ...) before it writes
    its first results, so that no result is lost and --resume never mixes two runs."""
    found = [name for name in ("metrics.jsonl", "config.json", "ckpt.pt", "policy") if os.path.exists(os.path.join(out_dir, name))]
    if not found:
        return
    previous = os.path.join(out_dir, "previous")
    n = 1 + max((int(d) for d in os.listdir(previous) if d.isdigit()), default=0) if os.path.isdir(previous) else 1
    os.makedirs(os.path.join(previous, str(n)))
    for name in found:
        os.replace(os.path.join(out_dir, name), os.path.join(previous, str(n), name))
    print(f"the earlier run's {', '.join(found)} moved to {os.path.join(previous, str(n))}")


@contextlib.contextmanager
def exclusive(out_dir):
    """One run at a time in out_dir: a lock on the folder, which the system releases when the process ends,
    however it ends (even by SIGKILL), so no lock is ever left behind."""
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another run is using {out_dir}: wait for it to end, or choose another --out_dir") from None
    try:
        yield
    finally:
        os.close(fd)
        if created and not os.listdir(out_dir):                          # a run that failed before writing
            os.rmdir(out_dir)                                            # leaves no trace


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback);
    Ctrl-C ends with status 130 and says how to resume."""
    hf_logging.disable_progress_bar()
    cfg = None
    try:
        cfg = parse_args(Config, sys.argv[1:] if argv is None else argv, __doc__)
        validate(cfg)
        if cfg.sample:
            return sample_policy(cfg)
        with exclusive(cfg.out_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            return train(cfg)                                            # (torchrun: rank 0 holds the lock)
    except KeyboardInterrupt:
        ckpt_path = cfg and os.path.join(cfg.out_dir, "ckpt.pt")
        print("\ninterrupted: " + (f"{ckpt_path} is intact; the same command with --resume=1 continues from it"
                                   if ckpt_path and os.path.exists(ckpt_path) else "no checkpoint yet, nothing to resume"),
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("APA_DEBUG", "0") not in ("", "0"):
            raise
        expected = isinstance(e, (ValueError, OSError, FloatingPointError))
        text = str(e) if expected else f"{type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)"
        raise SystemExit("error: " + " ".join(text.split()))           # one line, whatever the message


if __name__ == "__main__":
    main()
