"""
RLHF of a small GPT with APA or PPO, in one readable loop: sample, score, estimate values and
advantages, update. APA and PPO share everything but the policy loss (apa.py, ppo.py).

Paper: Zhu et al. 2023, "Fine-Tuning Language Models with Advantage-Induced Policy Alignment",
arXiv 2306.02231. Run: python train.py  (APA on the embedded task, a few minutes on a CPU)
          python train.py --algo=ppo --iters=100 --lam=0.2   (any field of Config as --key=value)
          python train.py --compare=1   (APA vs PPO, 3 seeds each, table and plot in out/compare)
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
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import data
from apa import apa_loss
from ppo import gae, kl_penalized_rewards, masked_mean, masked_whiten, ppo_policy_loss, value_loss

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    algo: str = "apa"              # "apa" or "ppo"
    apa_form: str = "exact"        # "exact": pi_old anchor, KL in the reward (fixed point pi*);
                                   # "paper": pi_init anchor, no KL in the reward (the paper's literal loss)
    lam: float = 0.1               # lambda: KL coefficient in the reward, and APA's Adv/lambda
    seed: int = 0                  # seeds sampling and minibatch order
    iters: int = 300               # RL iterations (one rollout and one update each)
    batch_size: int = 64           # responses per rollout
    minibatch_size: int = 32       # responses per gradient step
    epochs: int = 4                # passes over each rollout
    max_new_tokens: int = 20       # response length limit (the task's reviews take at most 18)
    lr: float = 3e-5               # Adam learning rate for the RL updates (APA diverged at 1e-4: README)
    max_grad_norm: float = 1.0     # gradient clipping
    gamma: float = 1.0             # discount
    gae_lambda: float = 0.95       # GAE's lambda
    vf_coef: float = 0.1           # weight of the value loss
    cliprange: float = 0.2         # PPO's epsilon
    cliprange_value: float = 0.2   # value clipping around the rollout's values
    max_bad_steps: int = 3         # stop after this many non-finite losses or gradients in a row
    # data and models
    prompts: str = ""              # prompts file (.txt, one a line; .jsonl, {"prompt": ...}); empty: the embedded task
    reward_fn: str = "data:sentiment_reward"  # 'module:function' (prompts, completions) -> floats
    reward_model: str = ""         # Hugging Face sequence-classification model (path or id); replaces reward_fn
    init: str = ""                 # Hugging Face causal LM (path or id) as pi_init; empty: pre-train a tiny GPT
    tokenizer: str = ""            # "task" or "gpt2"; empty: "gpt2" with --init, else "task"
    n_layer: int = 2               # the tiny GPT
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64           # context window of the tiny GPT
    sft_steps: int = 300           # pre-training steps of the tiny GPT on the task corpus (cached)
    sft_lr: float = 1e-3
    # output
    out_dir: str = "out"           # metrics.jsonl, ckpt.pt, policy/
    sft_dir: str = "out/sft"       # cache of the pre-trained tiny GPT
    sample_every: int = 50         # print decoded samples every N iterations (0: never)
    ckpt_every: int = 50           # checkpoint every N iterations (0: only at the end)
    resume: bool = False           # continue from out_dir/ckpt.pt
    jstar_samples: int = 256       # samples per prompt from pi_init to estimate J* (0: skip)
    device: str = "auto"           # "auto" (cuda if present), "cpu", "cuda"
    compare: bool = False          # run APA and PPO for seeds 0, 1, 2 and write out_dir/compare.{md,png}


def parse_config(argv):
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    if "-h" in argv or "--help" in argv:
        flags = "\n".join(f"  --{k}={v}" for k, v in vars(cfg).items())
        print(f"{__doc__}\nflags (--key=value) and their defaults:\n{flags}")
        sys.exit(0)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise ValueError(f"bad argument {arg!r}: expected --key=value with key one of {', '.join(fields)}")
        kind = type(getattr(cfg, key))
        try:
            value = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--{key} takes a {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, value)
    if cfg.algo not in ("apa", "ppo"):
        raise ValueError(f"unknown algorithm {cfg.algo!r} (use apa or ppo)")
    if cfg.apa_form not in ("exact", "paper"):
        raise ValueError(f"unknown apa_form {cfg.apa_form!r} (use exact or paper)")
    if not cfg.lam > 0:
        raise ValueError(f"lam must be > 0, got {cfg.lam}")
    if cfg.minibatch_size <= 0 or cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by minibatch_size {cfg.minibatch_size}")
    if cfg.compare and not cfg.jstar_samples > 0:
        raise ValueError("--compare reports the gap to J*: it needs jstar_samples > 0")
    if cfg.prompts and not os.path.exists(cfg.prompts):
        raise ValueError(f"{cfg.prompts} does not exist")
    for path in (cfg.init, cfg.reward_model):                           # a local path, not a hub id ("gpt2", "org/name")
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ValueError(f"{path} does not exist")
    return cfg


# ---------------------------------------------------------------------------------------------
# model: a causal LM with a scalar value head on its last hidden state


class PolicyWithValue(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, prompt_len):
        """Logits (B, T, V) and values (B, T) at the states before each response token."""
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, prompt_len)
        return logits, self.v_head(hidden).squeeze(-1).float()


def lm_forward(lm, input_ids, attention_mask, prompt_len):
    """input_ids, attention_mask (B, P + T), prompts left-padded to P. Returns the logits (B, T, V)
    that predict the T response tokens and the last hidden states (B, T, H) at the same positions."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)         # (B, P + T) skip left padding
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
    response_states = slice(prompt_len - 1, -1)                         # position t predicts token t + 1
    return out.logits[:, response_states].float(), out.hidden_states[-1][:, response_states]


def token_logprobs(logits, tokens):
    """log pi(tokens): logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def entropy(logits):
    """Entropy of each next-token distribution: logits (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits, -1)                                 # (B, T, V)
    return -(logp.exp() * logp).sum(-1)


def left_pad(token_lists, pad_id, device):
    """Token lists -> ids, attention mask, both (B, P), padded on the left."""
    width = max(map(len, token_lists))
    ids = [[pad_id] * (width - len(t)) + t for t in token_lists]
    mask = [[0] * (width - len(t)) + [1] * len(t) for t in token_lists]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, max_new_tokens, eot):
    """Sample responses at temperature 1 (no top-k/top-p) with a KV cache, stopping at end-of-text.
    prompt_ids, prompt_mask (B, P), left-padded. Returns response (B, T), mask (B, T) that is 1 up to
    and including the first end-of-text, and the sampler's log-probs (B, T) (0 on padding)."""
    attn = prompt_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                             # (B, P)
    out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)  # (B,)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float(), -1)          # (B, V)
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
        return GPT2LMHeadModel.from_pretrained(path).to(device)
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
        if step % 250 == 0 or step == cfg.sft_steps - 1:
            print(f"pre-training pi_init: step {step}/{cfg.sft_steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    lm.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
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
    with autocast(device):
        response, mask, _ = generate(lm, prompt_ids, prompt_mask, cfg.max_new_tokens, enc.eot_token)  # (B, T)
    completions = [enc.decode([t for t in r if t != enc.eot_token]) for r in response.tolist()]
    scores = check_scores(reward_fn([prompts[i] for i in idx], completions), len(idx)).to(device)  # (B,)
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
    # 2. log-probs under pi_old and pi_init, values
    with autocast(device):
        logits, values = policy(input_ids, attention_mask, P)            # (B, T, V), (B, T)
        ref_logits, _ = lm_forward(ref_lm, input_ids, attention_mask, P)  # (B, T, V)
    logprobs = token_logprobs(logits, response)                          # (B, T) log pi_old
    ref_logprobs = token_logprobs(ref_logits, response)                  # (B, T) log pi_init
    # 3. per-token rewards with the KL penalty, then GAE (the paper's literal APA: no KL in the reward)
    kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form == "paper" else cfg.lam
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)  # (B, T)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
    if cfg.algo == "ppo":
        advantages = masked_whiten(advantages, mask, mean_fn=global_mean)  # mean and variance over all processes
    kl = ((logprobs - ref_logprobs) * mask).sum(1)                       # (B,) sequence KL estimate
    stats = {"reward": global_mean(scores).item(), "kl": global_mean(kl).item(),   # over all processes
             "J": global_mean(scores - cfg.lam * kl).item(),
             "entropy": global_mean(entropy(logits), mask).item(),
             "distinct2": distinct_n(gather_all(completions), 2), "length": global_mean(mask.sum(1)).item()}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, advantages=advantages,
                 returns=returns)
    samples = list(zip([prompts[i] for i in idx], completions, scores.tolist(), kl.tolist()))
    return batch, P, stats, samples


def check_scores(scores, n):
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
    if scores.shape != (n,):
        raise ValueError(f"reward function returned {tuple(scores.shape)} scores for {n} completions")
    if not torch.isfinite(scores).all():
        raise ValueError(f"reward function returned non-finite scores: {scores[~torch.isfinite(scores)].tolist()[:5]}")
    return scores


def distinct_n(texts, n):
    """Unique n-grams / all n-grams of words and full stops over a batch of texts (Li et al. 2016):
    1.0 when nothing repeats, low under mode collapse."""
    grams = [tuple(w[i:i + n]) for w in (t.replace(".", " .").split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def autocast(device):
    """bf16 autocast on a GPU; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# update: several epochs of minibatches; APA and PPO differ only in the policy loss


def update(cfg, policy, opt, batch, P, bad_steps):
    stats, world = [], world_size()
    B = cfg.batch_size // world                                          # this process's share
    for _ in range(cfg.epochs):
        for mb_inds in torch.randperm(B).split(cfg.minibatch_size // world):
            mb = {k: v[mb_inds.to(v.device)] for k, v in batch.items()}
            with autocast(mb["response"].device):
                logits, values = policy(mb["input_ids"], mb["attention_mask"], P)  # (b, T, V), (b, T)
            logprobs = token_logprobs(logits, mb["response"])            # (b, T) log pi_theta
            if cfg.algo == "apa":
                ref = mb["ref_logprobs"] if cfg.apa_form == "paper" else None
                pg_loss, pg_stats = apa_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.lam, ref)
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
    rows, n = torch.arange(len(prompts)).repeat_interleave(cfg.jstar_samples), cfg.jstar_samples
    scores = torch.cat([sample(cfg, lm, chunk.tolist(), prompt_tokens, prompts, reward_fn, enc, device)[-1]
                        for chunk in rows.split(512)])                   # (prompts * n,)
    w = torch.exp(scores.double().cpu() / cfg.lam).view(len(prompts), n)  # (prompts, n) exp(R / lambda)
    jstar_x = cfg.lam * w.mean(1).log()                                  # (prompts,) J*(x)
    se_x = cfg.lam * w.std(1) / (w.mean(1) * math.sqrt(n))               # (prompts,) its standard error
    return jstar_x.mean().item(), (se_x.pow(2).sum().sqrt() / len(prompts)).item()


LOGGED = [("reward", ".3f"), ("kl", ".3f"), ("J", ".3f"), ("gap", ".3f"), ("entropy", ".2f"), ("distinct2", ".2f"),
          ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("vf_loss", ".4f")]  # the log line, in this order


def train(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if "RANK" in os.environ and not dist.is_initialized():              # launched by torchrun: data parallel
        device = init_distributed(cfg, device)
    master = rank() == 0                                                 # it alone prints and writes files
    if not master:
        dist.barrier()                                                   # rank 0 first pre-trains or downloads
    # data: prompts, tokenizer, reward
    enc = data.get_encoding(cfg.tokenizer or ("gpt2" if cfg.init else "task"))
    prompts = data.load_prompts(cfg.prompts) if cfg.prompts else data.task_prompts()
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    reward_fn = (data.reward_model_fn(cfg.reward_model, enc, device) if cfg.reward_model
                 else data.load_reward_fn(cfg.reward_fn))
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
    if lm.config.vocab_size < enc.n_vocab:
        raise ValueError(f"tokenizer has {enc.n_vocab} tokens but the model only {lm.config.vocab_size}")
    ref_lm = lm.eval().requires_grad_(False)
    jstar, jstar_se = (estimate_jstar(cfg, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
                       if cfg.jstar_samples else (None, None))
    torch.manual_seed(cfg.seed + rank())                                 # each process its own stream
    policy = PolicyWithValue(copy.deepcopy(ref_lm).requires_grad_(True)).to(device).eval()  # eval: no dropout,
    # so the update sees the very policy that sampled (pi_theta = pi_old before the first step)
    nn.init.zeros_(policy.v_head.weight)                                 # V = 0 at the start, for every seed
    nn.init.zeros_(policy.v_head.bias)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)

    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        start = load_checkpoint(ckpt_path, policy, opt, metrics_path)
        if master:
            print(f"resumed from {ckpt_path} at iteration {start}")
    model = DDP(policy) if dist.is_initialized() else policy             # DDP averages gradients over processes
    if master:
        print(f"{cfg.algo} | lambda {cfg.lam} | {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters | "
              f"{len(prompts)} prompts | device {device}" + (f" x {world_size()} processes" if dist.is_initialized() else "")
              + (f" | J* {jstar:.4f} +- {jstar_se:.4f}" if cfg.jstar_samples else ""))

    bad_steps, history = 0, []
    for it in range(start, cfg.iters):
        t0 = time.time()
        batch, P, stats, samples = rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn, enc, device)
        update_stats, bad_steps = update(cfg, model, opt, batch, P, bad_steps)
        stats.update(update_stats, iter=it + 1, samples=(it + 1) * cfg.batch_size, ms=1000 * (time.time() - t0))
        if cfg.jstar_samples:
            stats.update(gap=jstar - stats["J"], jstar=jstar, jstar_se=jstar_se)
        history.append(stats)
        if master:
            if it == 0 and os.path.exists(ckpt_path):                    # a fresh run: an older run's
                os.remove(ckpt_path)                                     # checkpoint must not be resumed
            with open(metrics_path, "a" if it > 0 else "w") as f:       # a fresh run starts a fresh file
                f.write(json.dumps(stats) + "\n")
            print(f"iter {it + 1}/{cfg.iters} | " + " | ".join(f"{k} {stats[k]:{fmt}}" for k, fmt in LOGGED if k in stats)
                  + f" | {stats['ms']:.0f}ms")
            if cfg.sample_every and (it + 1) % cfg.sample_every == 0:
                for prompt, completion, score, kl in samples[:4]:
                    print(f"    {prompt!r} -> {completion!r} | reward {score:+.2f} | kl {kl:.2f}")
        if (cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0) or it + 1 == cfg.iters:
            save_checkpoint(ckpt_path, policy, opt, it + 1)              # in every process (their RNG states)
    if master:
        policy.lm.save_pretrained(os.path.join(cfg.out_dir, "policy"))
        torch.save(policy.v_head.state_dict(), os.path.join(cfg.out_dir, "policy", "value_head.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


def save_checkpoint(path, policy, opt, iteration):
    """Everything to continue exactly: weights, optimizer, RNG states, iteration (= lines of metrics.jsonl).
    Written to a temporary file, then renamed, so a crash never leaves a half-written checkpoint.
    Data parallel: every process calls it, rank 0 writes, with every process's RNG states."""
    if not all(torch.isfinite(p).all() for p in policy.parameters()):
        raise FloatingPointError("non-finite weights: checkpoint not written")
    rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"policy": policy.state_dict(), "opt": opt.state_dict(), "iter": iteration, **rng}
    if dist.is_initialized():
        state["ranks_rng"] = gather_all([rng])                           # in rank order
    if rank() == 0:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)


def load_checkpoint(path, policy, opt, metrics_path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    policy.load_state_dict(state["policy"])
    opt.load_state_dict(state["opt"])
    rngs = state.get("ranks_rng", [state])                               # each process continues its own stream
    if dist.is_initialized() and len(rngs) != world_size():
        raise ValueError(f"{path} was written by {len(rngs)} processes: resume with as many")
    torch.set_rng_state(rngs[rank()]["rng"])
    if rngs[rank()]["cuda_rng"]:
        torch.cuda.set_rng_state_all(rngs[rank()]["cuda_rng"])
    if rank() == 0:
        with open(metrics_path) as f:                                    # drop iterations after the checkpoint
            lines = f.readlines()[:state["iter"]]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(metrics_path + ".tmp", metrics_path)
    return state["iter"]


def compare(cfg):
    """APA vs PPO with the same lambda, task and samples budget, for seeds 0, 1, 2. Writes a table
    (out_dir/compare.md) of the last 20 iterations' means and, with matplotlib, a plot (compare.png)."""
    t0, runs = time.time(), {}
    for algo in ("apa", "ppo"):
        for seed in (0, 1, 2):
            run_cfg = dataclasses.replace(cfg, algo=algo, seed=seed, compare=False, sample_every=0,
                                          out_dir=os.path.join(cfg.out_dir, f"{algo}_seed{seed}"))
            runs[algo, seed] = train(run_cfg)
    minutes = (time.time() - t0) / 60
    jstar, jstar_se = runs["apa", 0][0]["jstar"], runs["apa", 0][0]["jstar_se"]
    def smoothed(algo, key):                                             # (3, iters - 9) 10-iteration moving means
        return np.array([np.convolve([r[key] for r in runs[algo, s]], np.ones(10) / 10, "valid") for s in range(3)])
    columns = ["reward", "kl", "J", "gap", "distinct2", "entropy"]
    lines = [f"APA vs PPO, lambda {cfg.lam}, {cfg.iters} iterations x {cfg.batch_size} samples, seeds 0-2, "
             f"{minutes:.1f} min in all. J* = {jstar:.4f} +- {jstar_se:.4f} (standard error).",
             "Means over the last 20 iterations; +- is the standard deviation over seeds.", "",
             "| algo | " + " | ".join(columns) + " | gap +- s.e. | max kl (10-iter mean) |",
             "|---" * (len(columns) + 3) + "|"]
    for algo in ("apa", "ppo"):
        last = np.array([[np.mean([r[c] for r in runs[algo, s][-20:]]) for c in columns] for s in range(3)])  # (3, C)
        kl_max = smoothed(algo, "kl").max()
        gap_se = math.sqrt(last[:, 3].var(ddof=1) / 3 + jstar_se ** 2)
        cells = [f"{m:.3f} +- {d:.3f}" for m, d in zip(last.mean(0), last.std(0, ddof=1))]
        lines.append(f"| {algo} | " + " | ".join(cells) + f" | {last[:, 3].mean():.3f} +- {gap_se:.3f} | {kl_max:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return runs
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ["reward", "kl", "gap"], ["reward", "KL(pi || pi_init)", "J* - J (gap to optimum)"]):
        for algo, color in (("apa", "tab:blue"), ("ppo", "tab:orange")):
            curves = smoothed(algo, key)                                 # (3, iters - 9)
            x = np.array([r["samples"] for r in runs[algo, 0]])[9:]
            ax.plot(x, curves.mean(0), color=color, label=algo.upper())
            ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.2)
        ax.set(title=title, xlabel="samples")
        ax.grid(alpha=0.3)
    axes[2].axhline(0, color="black", lw=0.8)
    axes[0].legend()
    fig.suptitle(f"APA vs PPO, lambda {cfg.lam}: mean of 3 seeds (band: min to max), 10-iteration moving average")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "compare.png"), dpi=100)
    return runs


def main(argv=None):
    hf_logging.disable_progress_bar()
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        if cfg.compare:
            return compare(cfg)
        return train(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        raise SystemExit("error: " + " ".join(str(e).split()))         # one line, whatever the message


if __name__ == "__main__":
    main()
