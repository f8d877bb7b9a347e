"""
The checks of train.py's config: settings that mean nothing are refused, in one line that says why, before
anything is read or written (docs/runs.md). Files, models and reward functions are checked where they are loaded;
check_fits checks prompts and a tokenizer against a model's config before its weights are read.
"""
import math
import os
import stat

import torch

from grpo import CRITIC_FREE
from lab.cli import check_rules
from lab.ddp import gather_all, rank
from lab.hf import check_source
from lab.lora import require_peft
from model import get_device


def validate(cfg):
    """Refuse a config (its defaults resolved: train.resolve) whose settings mean nothing, saying why."""
    most_threads = 4 * (os.cpu_count() or 1)                            # more never helps; torch takes a C int
    check_rules(cfg, [  # (field, holds, what it must be)
        ("lam", cfg.lam > 0, "> 0"),
        ("awr_lam", cfg.awr_lam > 0, "> 0 (AWR's temperature)"),
        ("apa_clip", cfg.apa_clip >= 0, ">= 0 (0: unbounded APA)"),
        ("group_size", cfg.group_size >= (2 if cfg.algo in CRITIC_FREE else 1),
         f"{'>= 2 for ' + cfg.algo + ' (a baseline from the other responses)' if cfg.algo in CRITIC_FREE else '>= 1'}"),
        ("kl", (cfg.kl != "auto") if cfg.algo in CRITIC_FREE else cfg.kl == "auto",
         "auto for apa, ppo and awr (their reward carries the KL; --kl places grpo's and rloo's)"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("threads", 0 <= cfg.threads <= most_threads, f"in [0, {most_threads}], at most 4 a core of this machine "
                                                       "(0: one for the tiny GPT, torch's default with --init)"),
        ("iters", cfg.iters > 0, "> 0"),
        ("batch_size", cfg.batch_size > 0, "> 0"),
        ("minibatch_size", cfg.minibatch_size > 0, "> 0"),
        ("epochs", cfg.epochs > 0, "> 0 (passes over each rollout)"),
        ("max_new_tokens", cfg.max_new_tokens > 0, "> 0 (a response has at least one token)"),
        ("lr", 0 <= cfg.lr <= 0.1, "in [0, 0.1]: Adam moves every weight by about lr a step, so more wrecks a "
                                   "language model in a few steps (1e-6 to 1e-3 are usual)"),
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
    if cfg.batch_size % cfg.group_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by group_size {cfg.group_size}")
    for flag, path in (("--prompts", cfg.prompts), ("--eval_prompts", cfg.eval_prompts)):
        if not path or os.path.isfile(path):
            continue
        if not os.path.exists(path) or os.path.isdir(path):
            raise ValueError(f"{path} " + ("is a folder, not a prompts file" if os.path.isdir(path) else "does not exist"))
        if not stat.S_ISFIFO(os.stat(path).st_mode):                    # a named pipe, <(...), is read once
            raise ValueError(f"{flag}={path} is neither a regular file nor a pipe")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"{flag}={path} is a pipe, which only one process can read: under torchrun every "
                             "process reads the prompts, so give a regular file")
    if cfg.init.endswith(".gguf"):                                      # transformers reads one, but cannot save it
        raise ValueError(f"--init={cfg.init} is a GGUF file: convert it into a Hugging Face folder once, "
                         f"python -m lab.smollm2 --gguf={cfg.init} --out=FOLDER, then give --init=FOLDER")
    sources = [("--init", cfg.init, False), ("--reward_model", cfg.reward_model, False),
               ("--evaluator", cfg.evaluator, False),
               ("--tokenizer", "" if cfg.tokenizer in ("task", "gpt2") else cfg.tokenizer, True)]
    for flag, path, tokenizer in sources:                               # a local path, or a hub id ("gpt2", "org/name")
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ValueError(f"{path} does not exist")
        if path and not cfg.sample:
            check_source(flag, path, tokenizer)
    if cfg.lora_r:                                                      # an optional extra: known before any work
        require_peft()
    if cfg.sample and not os.path.isdir(cfg.sample):
        raise ValueError(f"--sample={cfg.sample} is no folder (a trained policy is a folder: out/policy)")
    get_device(cfg)


def check_fits(enc, prompt_tokens, max_new_tokens, config, what="prompt"):
    """Prompts and tokenizer fit the model (config: its Hugging Face config): no empty prompt, every prompt and
    its response within the context window, every token id a row of the embedding, the same end-of-text."""
    lengths = [len(t) for t in prompt_tokens] or [1]
    if min(lengths) == 0:
        raise ValueError(f"{what} {lengths.index(0) + 1} encodes to no token")
    context, longest = getattr(config, "max_position_embeddings", None), max(range(len(lengths)), key=lengths.__getitem__)
    if context and lengths[longest] + max_new_tokens > context:
        raise ValueError(f"{what} {longest + 1} has {lengths[longest]} tokens: with max_new_tokens={max_new_tokens} "
                         f"it exceeds the context window of {context}")
    if config.vocab_size < enc.n_vocab:                                  # more rows than tokens is fine: masked
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens but the model only {config.vocab_size}")
    eos = config.eos_token_id
    if eos is not None and enc.eot_token not in (eos if isinstance(eos, list) else [eos]):
        raise ValueError(f"tokenizer {enc.name} ends texts with id {enc.eot_token} but the model with {eos}: "
                         "not the model's tokenizer (--tokenizer)")


class BadSteps:
    """Non-finite steps: each is skipped with a warning, and max_bad_steps of them in a row stop the run with an
    error (the last checkpoint is clean). The loss is the mean over all processes and the gradient norm is the same in
    every process, so all processes skip alike."""

    def __init__(self, max_bad_steps):
        self.max_bad_steps, self.in_a_row = max_bad_steps, 0

    def skip(self, loss, grad_norm):
        """Whether to skip this step: the loss (a float) or the gradient norm (a tensor) is not finite."""
        if math.isfinite(loss) and torch.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if rank() == 0:
            print(f"warning: non-finite loss {loss} or gradient norm {grad_norm.item()}: step skipped")
        if self.in_a_row >= self.max_bad_steps:
            raise FloatingPointError(f"{self.in_a_row} non-finite updates in a row; stopping "
                                     "(the last checkpoint is clean)")
        return True


class SameRewards:
    """A run that cannot learn says so. If every response of the first batch gets the same reward, one warning names
    the reward and the value: a reward that cannot tell pi_init's responses apart (the embedded task's, which knows only
    its grammar's 16 adjectives, on a real model's text) leaves every algorithm nothing to learn from but the KL.
    Only the first batch is judged: later, a policy that earns the top reward in every response has learned.
    docs/models.md says what to do about it."""

    def __init__(self, cfg):
        self.name = f"reward model {cfg.reward_model}" if cfg.reward_model else f"reward {cfg.reward_fn}"
        self.judged = False

    def check(self, samples):
        """samples: this process's rollout samples, (prompt, completion, reward, kl) each; every process calls it."""
        if self.judged:
            return
        scores = gather_all([score for _, _, score, _ in samples])        # every process's responses
        self.judged = len(scores) > 1                                    # one response tells nothing
        if self.judged and len(set(scores)) == 1 and rank() == 0:
            print(f"warning: the {self.name} is {scores[0]:.3f} for all {len(scores)} responses: nothing to learn from "
                  "(docs/models.md: a reward that cannot tell responses apart)")
