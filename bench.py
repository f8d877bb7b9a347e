"""
Measurements of train.py's pieces, for the default tiny model (0.44M parameters, the task's vocabulary)
and a GPT-2-small-shaped model (124M, vocabulary 50,257), both with random weights (nothing to download):

1. our sampler (model.generate: KV cache, log-probs of the sampled tokens) against transformers'
   `generate` with the same batch, the same left-padded prompts and log-probs too (output_scores and
   compute_transition_scores), at temperature 1 without top-k. The two run interleaved (A B B A ...),
   since on a shared machine absolute times drift; the ratio is the median of the rounds' ratios.
2. seconds per RL iteration, split into generation, scoring forwards (log-probs of pi_old and pi_init,
   values, rewards) and the update, and the peak memory (cuda: max_memory_allocated; cpu: the process's
   peak resident set size, which only grows, so the larger model runs second).

Run: python bench.py   (a few minutes on 2 CPU cores)   python bench.py --device=cuda --batch_size=64
As in train.py, every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the traceback).
"""
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import common
import data
import model
import train


@dataclass
class Bench:
    models: Literal["both", "tiny", "gpt2-small"] = "both"  # which models to measure
    batch_size: int = 8            # prompts per batch (sampler and RL iteration)
    prompt_len: int = 16           # longest prompt; the others are shorter, so the batch is left-padded
    max_new_tokens: int = 32       # tokens sampled per prompt
    rounds: int = 3                # interleaved sampler rounds (each: ours and generate, order alternating)
    iters: int = 2                 # timed RL iterations, after one untimed
    epochs: int = 1                # update epochs per RL iteration (train.py's default is 4)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # as train.py's: auto is bf16 on cuda, fp32 on a CPU
    lora_r: int = 0                # LoRA's rank, as train.py's --lora_r (0: a full fine-tune)
    grad_checkpointing: bool = False  # as train.py's
    seed: int = 0                  # seeds weights, prompts and sampling


CONTEXT = {"tiny": train.Config().block_size, "gpt2-small": GPT2Config().n_positions}  # positions of each model


def validate(args):
    """Refuse flags that mean nothing, saying why, before a model is built."""
    common.check_rules(args, [  # (flag, holds, what it must be)
        ("batch_size", args.batch_size > 0, "> 0"),
        ("prompt_len", args.prompt_len >= 2, ">= 2 (prompts have prompt_len // 2 to prompt_len tokens, at least one)"),
        ("max_new_tokens", args.max_new_tokens > 0, "> 0"),
        ("rounds", args.rounds >= 0, ">= 0 (the ratio is a median over rounds; 0: no sampler comparison)"),
        ("lora_r", args.lora_r >= 0, ">= 0 (0: no LoRA)"),
        ("iters", args.iters > 0, "> 0 (timed iterations)"),
        ("epochs", args.epochs > 0, "> 0"),
        ("seed", args.seed >= 0, ">= 0"),
    ])
    for name in ["tiny", "gpt2-small"] if args.models == "both" else [args.models]:
        if args.prompt_len + args.max_new_tokens > CONTEXT[name]:       # the scoring forward sees both
            raise ValueError(f"prompt_len + max_new_tokens must be <= {CONTEXT[name]} (the {name} model's context), "
                             f"got {args.prompt_len} + {args.max_new_tokens}")


class IdsTokenizer:
    """Texts are space-separated token ids: the models have random weights, so words would mean nothing."""

    def __init__(self, n_vocab):
        self.name, self.n_vocab, self.eot_token = "ids", n_vocab, n_vocab - 1

    def encode_ordinary(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def length_reward(prompts, completions):
    return [len(c.split()) / 32 for c in completions]


def make_model(name):
    if name == "tiny":
        return model.tiny_gpt(train.Config(), data.task_encoding().n_vocab)
    return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # GPT-2 small's shape


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_samplers(args, cfg, lm, enc, device):
    """Tokens/s of model.generate and of transformers' generate, interleaved, and the median ratio."""
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,)).tolist()
    prompts = [torch.randint(enc.n_vocab - 1, (n,)).tolist() for n in lengths]
    ids, mask = model.left_pad(prompts, enc.eot_token, device)          # (B, P)

    def ours():
        response, _, logprobs = model.generate(lm, ids, mask, args.max_new_tokens, enc.eot_token, enc.n_vocab)
        return response.shape[1]

    def theirs():
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=args.max_new_tokens, eos_token_id=enc.eot_token, pad_token_id=enc.eot_token,
                          output_scores=True, return_dict_in_generate=True)
        logprobs = lm.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, T)
        return logprobs.shape[1]

    def tokens_per_s(fn):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), model.autocast(cfg, device):
            steps = fn()
        sync(device)
        return args.batch_size * steps / (time.perf_counter() - t0)

    tokens_per_s(ours), tokens_per_s(theirs)                            # warm-up
    a, b = [], []
    for r in range(args.rounds):
        pair = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        first, second = tokens_per_s(pair[0]), tokens_per_s(pair[1])
        a.append(first if r % 2 == 0 else second)
        b.append(second if r % 2 == 0 else first)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def time_iterations(args, cfg, lm, enc, device):
    """Seconds per RL iteration in generation, scoring forwards and update (medians of args.iters)."""
    prompts = [" ".join(str(t) for t in torch.randint(enc.n_vocab - 1, (n,)).tolist())
               for n in torch.randint(args.prompt_len // 2, args.prompt_len + 1, (64,)).tolist()]
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    policy, ref_lm = model.make_policy(cfg, lm, enc.n_vocab, device)    # as train.py builds them
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    generate, gen_s = model.generate, []

    def timed_generate(*a, **k):                                        # rollout calls it through model.sample()
        sync(device)
        t0 = time.perf_counter()
        out = generate(*a, **k)
        sync(device)
        gen_s.append(time.perf_counter() - t0)
        return out
    model.generate = timed_generate
    rows = []
    try:
        for _ in range(args.iters + 1):
            t0 = time.perf_counter()
            batch, P, _, _ = train.rollout(cfg, policy, ref_lm, prompt_tokens, prompts, length_reward, enc, device)
            sync(device)
            t1 = time.perf_counter()
            train.update(cfg, policy, opt, batch, P, 0)
            sync(device)
            rows.append((gen_s[-1], t1 - t0 - gen_s[-1], time.perf_counter() - t1))
    finally:
        model.generate = generate
    return [statistics.median(col) for col in zip(*rows[1:])]


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args):
    device = train.get_device(args)
    cfg = train.resolve(train.Config(batch_size=args.batch_size, minibatch_size=max(1, args.batch_size // 2), epochs=args.epochs,
                       max_new_tokens=args.max_new_tokens, device=args.device, precision=args.precision,
                       lora_r=args.lora_r, grad_checkpointing=args.grad_checkpointing))
    names = ["tiny", "gpt2-small"] if args.models == "both" else [args.models]
    print(f"device {device} | batch {args.batch_size} | prompts <= {args.prompt_len} tokens | {args.max_new_tokens} "
          f"new tokens | RL iteration: {cfg.epochs} epoch(s) of minibatches of {cfg.minibatch_size} | "
          f"bf16 autocast: {model.bf16(cfg, device)}" + (f" | LoRA r {cfg.lora_r}" if cfg.lora_r else " | full fine-tune")
          + (" | activation checkpointing" if cfg.grad_checkpointing else ""))
    lines = ["| model | params | sampler tok/s | generate tok/s | ratio | generation s/iter | scoring s/iter "
             "| update s/iter | peak memory GB |", "|---" * 9 + "|"]
    for name in names:
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lm = make_model(name).to(device).eval()
        enc = IdsTokenizer(lm.config.vocab_size)
        t0 = time.time()
        ours, theirs, ratio = time_samplers(args, cfg, lm, enc, device) if args.rounds else (math.nan,) * 3
        gen, score, upd = time_iterations(args, cfg, lm, enc, device)
        params = sum(p.numel() for p in lm.parameters()) / 1e6
        lines.append(f"| {name} | {params:.2f}M | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | {gen:.3f} | {score:.3f} "
                     f"| {upd:.3f} | {peak_memory_gb(device):.2f} |")
        print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
    print("\n".join(lines))
    return lines


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback)."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with common.one_line_errors():
        args = common.parse_args(Bench, sys.argv[1:] if argv is None else argv, __doc__)
        validate(args)
        return measure(args)


if __name__ == "__main__":
    main()
