"""
A reward model learned from preferences: the Bradley-Terry loss, the pairs it learns from (a simulated annotator on
the embedded task, or your own file), and a sequence classifier with one output, started from pi_init and saved as
a Hugging Face folder that `python train.py --reward_model=DIR` loads.

Papers: Bradley & Terry 1952, "Rank analysis of incomplete block designs I: the method of paired comparisons",
Biometrika 39 (the pair model P(y1 preferred to y2) = sigmoid(r(y1) - r(y2))); Christiano et al.
2017, arXiv 1706.03741, Sec. 2.2.3 (a reward fitted to human comparisons, then RL against it); Ouyang et al. 2022,
arXiv 2203.02155, Sec. 3.5 and Eq. 1 (the SFT model with one scalar output, the loss -log sigmoid(r(x, y_w) -
r(x, y_l))); Gao, Schulman & Hilton 2022, arXiv 2210.10760 (a "gold" reward labels the pairs in place of people, so
that over-optimisation of the learned "proxy" reward can be measured against it).

Run: python reward_model.py                        pairs of pi_init's responses, labelled by a simulated annotator:
                                                   under a minute on 2 CPU cores once pi_init is cached in out/sft
     python reward_model.py --preferences=FILE     your own pairs (.jsonl, docs/models.md), --init=MODEL your own LM
     python train.py --reward_model=out/reward_model

Where this departs from the papers:
1. The annotator of the embedded task is simulated. It prefers y1 to y2 with probability
   sigmoid((R(y1) - R(y2)) / beta), R the task's reward (data.sentiment_reward): the Bradley-Terry model itself, with
   the reward R / beta. The loss's population minimiser is then R / beta + c(x), and the policy it induces at lambda
   is R's pi* at lambda * beta (docs/theory.md, section 10). The default beta = 1 keeps the learned reward on R's
   scale, so that --lam means the same against both.
2. Each pair is one sample; Ouyang et al. put the K(K - 1)/2 pairs of K ranked responses in one batch element.
3. The score is not shifted to mean 0 (Ouyang et al. do, on the SFT demonstrations): a constant changes no pi*.
4. No end-of-text token is appended: the text scored is prompt + completion, exactly as train.py's reward model
   (lab/hf.reward_model_fn) reads it, right-padded, at the last real token.
5. Dropout is off (the tiny GPT has none), as in train.py's policy.
"""
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from data import sentiment_reward, task_eval_prompts, task_prompts
from lab import cli, runs
from lab.hf import HFTokenizer, load_config, load_tokenizer, quiet
from lab.runs import load_pi_init
from model import generate, get_device, left_pad, right_pad, set_cpu_threads, status, tiny_gpt_config

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # --- preferences
    preferences: str = ""          # your pairs, .jsonl: {"prompt", "chosen", "rejected"} or {"chosen", "rejected"}
                                   # (the shared beginning is the prompt); empty: the embedded task's annotator
    pairs: int = 2500              # the embedded task: pairs of pi_init's responses, each to a prompt drawn at random
    beta: float = 1.0              # the annotator's noise: it prefers y1 with probability sigmoid((R(y1) - R(y2)) / beta)
    held_out: float = 0.2          # share of the pairs held out to measure accuracy; the embedded task draws these
                                   # on its held-out prompts (data.task_eval_prompts), the others on the training ones
    max_new_tokens: int = 20       # length limit of the sampled responses, as train.py's
    # --- optimisation
    seed: int = 0                  # seeds the pairs, the labels and the order of the steps
    epochs: int = 4                # passes over the training pairs
    batch_size: int = 32           # pairs per step
    lr: float = 3e-4               # AdamW's learning rate, decayed linearly to 0
    max_grad_norm: float = 1.0     # gradient clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    threads: int = 0               # torch's threads on a CPU after pre-training; 0: one for the tiny GPT, else torch's
    # --- the model: pi_init with one output in place of its LM head (the fields of train.py's pi_init)
    init: str = ""                 # Hugging Face causal LM (path or id) to start from; empty: the tiny GPT
    tokenizer: str = ""            # "task", "gpt2" or a Hugging Face one (path or id); empty: --init's own, or "task"
    n_layer: int = 2               # layers of the tiny GPT
    n_head: int = 4                # attention heads of the tiny GPT
    n_embd: int = 128              # width of the tiny GPT
    block_size: int = 64           # context window of the tiny GPT
    sft_steps: int = 300           # pre-training steps of the tiny GPT on the task corpus (cached)
    sft_lr: float = 1e-3           # pre-training learning rate
    # --- output
    out_dir: str = "out/reward_model"  # the Hugging Face folder and metrics.json, replaced whole by each run
    sft_dir: str = "out/sft"       # cache of the pre-trained tiny GPT, shared with train.py


def check(cfg):
    """Refuse, before any work, a config that means nothing, and an out_dir that is no folder, cannot be written, or
    holds something other than a reward model of this script (each run replaces its out_dir whole)."""
    most_threads = 4 * (os.cpu_count() or 1)                            # as train.py: more never helps
    n_eval = max(1, round(cfg.held_out * cfg.pairs))                     # the embedded task's held-out pairs
    cli.check_rules(cfg, [("pairs", cfg.pairs >= 2, "at least 2"), ("beta", cfg.beta > 0, "> 0"),
                          ("held_out", 0 < cfg.held_out < 1, "in (0, 1)"),
                          ("held_out", cfg.preferences or n_eval < cfg.pairs,
                           f"small enough that a pair is left to train on: {n_eval} of --pairs={cfg.pairs} held out"),
                          ("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
                          ("lr", 0 <= cfg.lr <= 0.1, "in [0, 0.1], as train.py's (1e-5 to 1e-3 are usual)"),
                          ("max_grad_norm", cfg.max_grad_norm > 0, "> 0"),
                          ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"), ("seed", cfg.seed >= 0, ">= 0"),
                          ("threads", 0 <= cfg.threads <= most_threads,
                           f"in [0, {most_threads}], at most 4 a core of this machine"),
                          ("n_layer", cfg.n_layer > 0, "> 0"), ("n_head", cfg.n_head > 0, "> 0"),
                          ("n_embd", cfg.n_embd > 0 and cfg.n_embd % max(cfg.n_head, 1) == 0,
                           f"> 0 and divisible by n_head={cfg.n_head}"), ("block_size", cfg.block_size > 0, "> 0"),
                          ("sft_steps", cfg.sft_steps > 0, "> 0 (pre-training steps)"),
                          ("sft_lr", 0 < cfg.sft_lr <= 0.1, "in (0, 0.1]"),
                          ("out_dir", cfg.out_dir != "", "a folder"), ("sft_dir", cfg.sft_dir != "", "a folder")])
    if cfg.preferences and not os.path.isfile(cfg.preferences):
        raise ValueError(f"--preferences={cfg.preferences} " + ("is a folder, not a file" if os.path.isdir(
            cfg.preferences) else "does not exist"))
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir {cfg.out_dir} is a file, not a folder: give a new or empty folder")
    parent = os.path.dirname(os.path.abspath(cfg.out_dir))
    while not os.path.exists(parent):                                    # the folder the run will write in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {cfg.out_dir} cannot be written: {parent} is " +
                         ("a file" if not os.path.isdir(parent) else "read-only"))
    if not is_reward_model(cfg.out_dir):
        raise ValueError(f"out_dir {cfg.out_dir} holds files that are not a reward model of reward_model.py "
                         "(metrics.json with its config, the model and its tokenizer): each run replaces its "
                         "out_dir whole, so give a new or empty folder")


SAVED = {"config.json", "model.safetensors", "model.safetensors.index.json", "metrics.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
         "added_tokens.json", "chat_template.jinja", "generation_config.json"}   # what save() may write


def is_reward_model(path):
    """Whether the folder path is missing, empty, or a reward model that save() wrote: its metrics.json holds this
    script's config, and it holds no file that save() does not write. Only such a folder is ever replaced."""
    if not os.path.isdir(path) or not os.listdir(path):
        return True
    if any(name not in SAVED and not re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) for name in os.listdir(path)):
        return False
    try:
        with open(os.path.join(path, "metrics.json")) as f:
            config = json.load(f)["config"]
        return {"preferences", "pairs", "beta", "held_out"} <= config.keys()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# the loss


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """The Bradley-Terry loss of a reward model on preference pairs (Ouyang et al. 2022, Eq. 1). Returns (loss, stats).

        L(r) = -E_{(x, y_w, y_l)} [ log sigmoid( r(x, y_w) - r(x, y_l) ) ]

    It is the negative log-likelihood of the labels under the model P(y_w preferred to y_l) = sigmoid(r(x, y_w) -
    r(x, y_l)). With labels drawn from that model with the reward R / beta, its population minimiser is
    R / beta + c(x) (docs/theory.md, section 10).

    chosen_rewards   (B,) r(x, y_w) of the preferred responses, with grad
    rejected_rewards (B,) r(x, y_l) of the other responses, with grad
    stats: accuracy, the share of pairs that r orders as the labels do (a tie is not ordered), and margin, the mean
    of r(y_w) - r(y_l).
    """
    margin = chosen_rewards - rejected_rewards                   # (B,) r(x, y_w) - r(x, y_l)
    loss = -F.logsigmoid(margin).mean()                          # ()   L(r), Eq. 1
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


# ---------------------------------------------------------------------------------------------
# preferences: the embedded task's simulated annotator, or a file


def annotate(rewards1, rewards2, beta):
    """The simulated annotator: whether it prefers y1 to y2, with probability sigmoid((R(y1) - R(y2)) / beta).
    rewards1, rewards2 (N,) the true rewards R of the two responses. Returns (N,) bools, drawn from torch's RNG."""
    p = torch.sigmoid((rewards1 - rewards2) / beta)              # (N,) P(y1 preferred to y2)
    return torch.rand(p.shape) < p                               # (N,)


@torch.no_grad()
def task_pairs(cfg, lm, enc, prompts, n, device):
    """n pairs of pi_init's responses (temperature 1) to prompts drawn at random, labelled by the annotator.
    Returns the pairs (prompt, chosen, rejected) and their true rewards (n, 2): R(chosen), R(rejected)."""
    idx = torch.randint(len(prompts), (n,)).repeat_interleave(2).tolist()        # each prompt twice in a row
    prompt_ids, prompt_mask = left_pad([enc.encode_ordinary(prompts[i]) for i in idx], enc.eot_token, device)
    response, _, _ = generate(lm, prompt_ids, prompt_mask, cfg.max_new_tokens, enc.eot_token, enc.n_vocab)  # (2n, T)
    completions = [enc.decode([t for t in r if t != enc.eot_token]) for r in response.tolist()]  # as train.py's
    true = torch.tensor(sentiment_reward([prompts[i] for i in idx], completions)).view(n, 2)   # (n, 2) R(y1), R(y2)
    first = annotate(true[:, 0], true[:, 1], cfg.beta)                           # (n,) y1 preferred
    pairs = [(prompts[idx[2 * k]],) + ((y1, y2) if first[k] else (y2, y1))
             for k, (y1, y2) in enumerate(zip(completions[::2], completions[1::2]))]
    return pairs, torch.where(first[:, None], true, true.flip(1))                 # (n, 2) R(chosen), R(rejected)


def read_preferences(path):
    """Pairs (prompt, chosen, rejected, line number) from a .jsonl file in TRL's two layouts: {"prompt", "chosen",
    "rejected"}, or {"chosen", "rejected"} whose shared beginning is taken as the prompt. A line that is not such a
    pair is refused with its number: text that is not UTF-8, no JSON object, a missing key, a value that is not a
    string, an empty or identical chosen and rejected."""
    with open(path, "rb") as f:
        raw = f.read()
    pairs, layout = [], '{"prompt", "chosen", "rejected"} or {"chosen", "rejected"}'
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8-sig" if i == 1 else "utf-8").rstrip("\r")   # a byte-order mark is no text
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg}): expected {layout}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: a JSON {type(row).__name__}, not an object: expected {layout}")
        for key in ("chosen", "rejected"):
            if key not in row:
                raise ValueError(f'{path}:{i}: no "{key}": expected {layout}')
        for key in (k for k in ("prompt", "chosen", "rejected") if k in row):
            if not isinstance(row[key], str):
                raise ValueError(f'{path}:{i}: "{key}" is not a string: {json.dumps(row[key])[:40]}')
            if key != "prompt" and not row[key]:
                raise ValueError(f'{path}:{i}: "{key}" is empty')
        chosen, rejected = row["chosen"], row["rejected"]
        if chosen == rejected:
            raise ValueError(f'{path}:{i}: "chosen" and "rejected" are the same text')
        prompt = row["prompt"] if "prompt" in row else os.path.commonprefix([chosen, rejected])
        if "prompt" not in row:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        pairs.append((prompt, chosen, rejected, i))
    if not pairs:
        raise ValueError(f"{path} holds no pair: expected one JSON object a line, {layout}")
    return pairs


def split(pairs, held_out):
    """The indices (train, test) of a file's pairs: a share held_out of its distinct pairs, drawn with torch's RNG, is
    held out with every line that repeats one of them, so that no held-out pair is also a training pair."""
    keys = [tuple(pair[:3]) for pair in pairs]                   # (prompt, chosen, rejected)
    distinct = list(dict.fromkeys(keys))
    order = torch.randperm(len(distinct)).tolist()
    n_eval = max(1, round(held_out * len(distinct)))
    test = {distinct[i] for i in order[:n_eval]}
    train = {distinct[i] for i in order[n_eval:]}
    return [i for i, k in enumerate(keys) if k in train], [i for i, k in enumerate(keys) if k in test]


def encode(enc, text, context=None):
    """The tokens of prompt + completion as train.py's reward model reads them (lab/hf.reward_model_fn): the
    model's own tokenizer called on the whole text (special tokens, such as a start token, included; a text longer
    than the context cut on the left, as train() sets it up), else the policy's tokenizer, the last `context`
    tokens; no end-of-text."""
    if isinstance(enc, HFTokenizer):
        return enc.tok(text, truncation=bool(context), max_length=context)["input_ids"]
    return enc.encode_ordinary(text)[-context:] if context else enc.encode_ordinary(text)


def tokenize(pairs, enc, context, path=""):
    """The tokens of each pair's two texts, prompt + chosen and prompt + rejected. A pair of the file at path
    longer than the model's context is refused with its line; the embedded task's responses (whose bytes may decode
    to longer text) keep their last `context` tokens, as lab/hf.reward_model_fn keeps them."""
    tokens = []
    for prompt, chosen, rejected, *line in pairs:
        if path and context:
            n = max(len(encode(enc, prompt + chosen)), len(encode(enc, prompt + rejected)))
            if n > context:
                raise ValueError(f"{path}:{line[0]}: the pair has {n} tokens, more than the model's context of "
                                 f"{context}")
        tokens.append((encode(enc, prompt + chosen, context), encode(enc, prompt + rejected, context)))
    return tokens


# ---------------------------------------------------------------------------------------------
# the model: pi_init's network with one output, read at the last real token


def reward_model_from(lm, pad_id):
    """A sequence classifier with one output, its network pi_init's (the causal LM lm, its LM head dropped) and
    its score head 0, so that every reward is 0 at the start. pad_id marks padding, where it finds the last token."""
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_id, None
    with quiet():
        rm = AutoModelForSequenceClassification.from_config(config)
    rm.base_model.load_state_dict(lm.base_model.state_dict())
    nn.init.zeros_(rm.score.weight)
    return rm.to(lm.device).eval()                               # no dropout


def rewards(rm, token_lists, pad_id):
    """r(x, y) (B,) of token lists (prompt + completion): right-padded with pad_id, one forward pass, the score
    head on the last real token's hidden state, as the classifier's own forward reads it at RL time."""
    device = rm.device
    ids, mask = right_pad(token_lists, pad_id, device)                                              # (B, L), (B, L)
    hidden = rm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state                    # (B, L, H)
    last = mask.sum(1) - 1                                                                          # (B,) last real
    return rm.score(hidden[torch.arange(len(ids), device=device), last]).squeeze(-1).float()        # (B,) r(x, y)


# ---------------------------------------------------------------------------------------------
# held-out accuracy


def spearman(x, y):
    """Spearman's rank correlation of two sequences: the Pearson correlation of their ranks, tied values sharing
    their mean rank; NaN where a value is not finite (it has no rank)."""
    def ranks(v):
        order = np.empty(len(v))
        order[np.argsort(v, kind="stable")] = np.arange(len(v))                   # 0 .. n-1
        _, group = np.unique(v, return_inverse=True)
        return (np.bincount(group, order) / np.bincount(group))[group]            # the mean rank of each tie
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    with np.errstate(invalid="ignore"):                                          # a constant: NaN, no warning
        return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def within_prompts(v, group):
    """v (m,) minus the mean of v over its prompt (group (m,) the prompt's index): what is left once c(x) is out."""
    means = torch.zeros(int(group.max()) + 1, dtype=v.dtype).index_add_(0, group, v) / torch.bincount(group)
    return v - means[group]                                                       # (m,)


def held_out_stats(r, true=None, prompts=None):
    """Held-out accuracy of the scores r (n, 2), r(chosen) and r(rejected): the share of pairs that r orders as the
    labels do (a tie is not ordered). With the true rewards (n, 2) of the embedded task and each pair's prompt:
    the share that r orders as R does (pairs of equal R left out; a tie of r agrees with neither order), the labels'
    own agreement with R (the annotator's noise), Spearman's rank correlation of r with R over the responses, and the
    least-squares slope of r on R within prompts (r and R centred on each prompt's mean, so that c(x) is out): the
    population minimiser R / beta + c(x) has the slope 1 / beta exactly (docs/theory.md, section 10)."""
    r = r.double()
    stats = {"pairs": len(r), "accuracy": (r[:, 0] > r[:, 1]).double().mean().item()}
    if true is None or not (true[:, 0] != true[:, 1]).any():                     # R orders no pair
        return stats
    true = true.double()
    untied = true[:, 0] != true[:, 1]                                             # (n,)
    agree = torch.sign(r[:, 0] - r[:, 1]) == torch.sign(true[:, 0] - true[:, 1])  # (n,)
    group = torch.tensor(np.unique(prompts, return_inverse=True)[1]).repeat_interleave(2)  # (2n,) each response's
    r_c, true_c = within_prompts(r.flatten(), group), within_prompts(true.flatten(), group)  # (2n,), (2n,)
    stats.update(accuracy_true=agree[untied].double().mean().item(), ties=int((~untied).sum()),
                 labels_true=(true[untied, 0] > true[untied, 1]).double().mean().item(),
                 spearman=spearman(r.flatten().tolist(), true.flatten().tolist()))
    if (true_c ** 2).sum() > 0:                                                   # R varies within some prompt
        stats["slope"] = ((r_c * true_c).sum() / (true_c ** 2).sum()).item()
    return stats


@torch.no_grad()
def evaluate(rm, tokens, pad_id, batch=256):
    """The scores (n, 2) r(chosen), r(rejected) of the held-out pairs' tokens, in batches."""
    return torch.cat([rewards(rm, [t for pair in tokens[i:i + batch] for t in pair], pad_id).view(-1, 2).cpu()
                      for i in range(0, len(tokens), batch)])                     # (n, 2)


# ---------------------------------------------------------------------------------------------
# training


def train(cfg):
    """Fit the reward model to the preferences, print and save its held-out accuracy, write out_dir."""
    device, t0 = get_device(cfg), time.time()
    file_pairs = read_preferences(cfg.preferences) if cfg.preferences else None   # a broken file: before any work
    enc = load_tokenizer(cfg)                                    # the task's, GPT-2's, or --init's own
    prompts, eval_prompts = task_prompts(), task_eval_prompts()
    config = load_config(cfg.init) if cfg.init else tiny_gpt_config(cfg, enc.n_vocab)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(enc, HFTokenizer):                             # pad on the right and cut long texts on the left,
        enc.tok.pad_token = enc.tok.pad_token or enc.tok.eos_token  # here and, saved with the model, at RL time
        enc.tok.padding_side, enc.tok.truncation_side = "right", "left"
        enc.tok.model_max_length = context or enc.tok.model_max_length
    pad_id = enc.tok.pad_token_id if isinstance(enc, HFTokenizer) else enc.eot_token
    if file_pairs:                                               # too long, or too few: before any work too
        file_tokens = tokenize(file_pairs, enc, context, cfg.preferences)
        distinct = len(set(pair[:3] for pair in file_pairs))
        if distinct < 2:
            raise ValueError(f"{cfg.preferences} holds {distinct} distinct pair in {len(file_pairs)} lines: too few "
                             "to hold out a share")
        if distinct < len(file_pairs):
            print(f"warning: {cfg.preferences}: {len(file_pairs) - distinct} of {len(file_pairs)} lines repeat an "
                  "earlier pair; each pair is held out or trained on with all its copies")
    lm = load_pi_init(cfg, enc, [] if file_pairs else [enc.encode_ordinary(p) for p in prompts],
                      [] if file_pairs else [enc.encode_ordinary(p) for p in eval_prompts], device)
    set_cpu_threads(cfg, device)
    torch.manual_seed(cfg.seed)                                  # the one seed of the pairs, labels and steps

    # 1. the pairs: the task's, labelled by the annotator (held out: on the held-out prompts), or the file's
    if file_pairs:
        train_idx, test_idx = split(file_pairs, cfg.held_out)
        train_tokens, test = [file_tokens[i] for i in train_idx], [file_tokens[i] for i in test_idx]
        test_true, test_prompts = None, None
    else:
        n_eval = max(1, round(cfg.held_out * cfg.pairs))
        train_pairs, _ = task_pairs(cfg, lm, enc, prompts, cfg.pairs - n_eval, device)
        test_pairs, test_true = task_pairs(cfg, lm, enc, eval_prompts, n_eval, device)
        train_tokens, test = tokenize(train_pairs, enc, context), tokenize(test_pairs, enc, context)
        test_prompts = [p for p, _, _ in test_pairs]

    # 2. the model: pi_init's network, one output
    rm = reward_model_from(lm, pad_id)
    del lm
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * -(-len(train_tokens) // cfg.batch_size)              # the last batch may be partial
    print(f"reward model | {len(train_tokens)} pairs ({len(test)} held out) | "
          f"{sum(p.numel() for p in rm.parameters()) / 1e6:.2f}M parameters | {steps} steps | device {device}")

    # 3. steps of the Bradley-Terry loss over shuffled pairs
    step, t1 = 0, time.time()
    for _ in range(cfg.epochs):
        for mb_inds in torch.randperm(len(train_tokens)).split(cfg.batch_size):
            r = rewards(rm, [t for i in mb_inds.tolist() for t in train_tokens[i]], pad_id).view(-1, 2)  # (b, 2)
            loss, stats = bradley_terry_loss(r[:, 0], r[:, 1])
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1 - step / steps)                            # linear decay to 0
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)
            opt.step()
            step += 1
            status(f"step {step}/{steps} | loss {loss.item():.3f} | accuracy {stats['accuracy']:.2f} | "
                       f"{time.time() - t1:.0f}s", done=step == steps)

    # 4. held-out accuracy, printed and saved with the model
    metrics = held_out_stats(evaluate(rm, test, pad_id), test_true, test_prompts)
    metrics |= {"seconds": time.time() - t0, "config": asdict(cfg)}
    print(f"held out: {metrics['pairs']} pairs | accuracy {metrics['accuracy']:.3f} against the labels"
          + (f" | accuracy {metrics['accuracy_true']:.3f} against the true reward's order ({metrics['ties']} pairs "
             f"of equal R left out; the labels': {metrics['labels_true']:.3f}) | spearman {metrics['spearman']:.3f}"
             if "accuracy_true" in metrics else "")
          + (f" | slope {metrics['slope']:.2f} with R within prompts (the population minimiser's: 1/beta = "
             f"{1 / cfg.beta:.2f})" if "slope" in metrics else "") + f" | {metrics['seconds']:.0f}s")
    save(cfg, rm, enc, metrics)
    print(f"saved {cfg.out_dir}: python train.py --reward_model={cfg.out_dir}")
    return metrics


def save(cfg, rm, enc, metrics):
    """out_dir, replaced whole and in one step (lab/runs.replace_folder: a kill leaves the earlier model or this one,
    never a mix, so that no file of an earlier model stays, such as its tokenizer): the Hugging Face folder (config
    with num_labels 1 and pad_token_id, weights, the tokenizer where it is a Hugging Face one) and metrics.json."""
    def write(tmp):
        with quiet():
            rm.save_pretrained(tmp)
            if isinstance(enc, HFTokenizer):
                enc.tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if not is_reward_model(cfg.out_dir):                         # check() looked before training: look again
        raise ValueError(f"out_dir {cfg.out_dir} holds files that are not a reward model of reward_model.py: "
                         "nothing was written")
    runs.replace_folder(cfg.out_dir, write)


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback)."""
    with cli.one_line_errors():
        cfg = cli.parse_args(Config, sys.argv[1:] if argv is None else argv, __doc__)
        check(cfg)
        with runs.exclusive(cfg.out_dir):                        # one run at a time in out_dir, as train.py's
            return train(cfg)


if __name__ == "__main__":
    main()
