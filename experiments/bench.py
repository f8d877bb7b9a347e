"""
Measurements of train.py's pieces, with random weights (nothing to download): the default tiny model (0.44M
parameters, the task's vocabulary), a GPT-2-small-shaped model (124M, vocabulary 50,257) and the Pythia-1B
shape (GPT-NeoX 16 x 2048, vocabulary 50,304):

1. three samplers on one batch of left-padded prompts, at temperature 1, each returning log-probs too:
   the static sampler (lab/static_sampler.py: a static KV cache, 8 tokens per CUDA graph replay on a GPU;
   on a CPU the same cache without a graph), model.generate's eager loop (the CPU's sampler), and transformers'
   `generate` (output_scores and compute_transition_scores). They run interleaved, the order rotating each
   round, since on a shared machine absolute times drift; the ratios are medians of the rounds' ratios.
2. seconds per RL iteration, split into generation, scoring forwards (log-probs of pi_old and pi_init,
   values, rewards) and the update; the update's TFLOP/s (the FLOPs of its matrix products and attention,
   counted by torch's FlopCounterMode) against a large matrix product's in the same precision; and the peak
   memory (cuda: max_memory_allocated; cpu: the process's peak resident set size, which only grows, so the
   larger model runs second). The KL guard is off, so that every update takes all its steps.
3. --profile: torch.profiler's table of one more update, the operations that take the most time.
4. --reward_model=1 instead: train.py's default RL iteration on the embedded task (the tiny GPT pre-trained as
   pi_init, 64 responses, 4 epochs), against the task's rule and against a tiny reward model built as
   reward_model.py builds it (pi_init's network with one output, loaded back as train.py loads it), interleaved
   round by round; the ratio is the median of the rounds' ratios.

Run: python -m experiments.bench   (a few minutes on 2 CPU cores)
     python -m experiments.bench --device=cuda --models=gpt2-small --batch_size=64 --max_new_tokens=128 --epochs=4
As in train.py, every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the traceback).
"""
import contextlib
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

import data
import model
import train
from lab import cli, lora
from lab.static_sampler import choose_sampler, generate_static
from tools.gpu_models import ROWS, SHAPES


@dataclass
class Bench:
    models: Literal["both", "tiny", "gpt2-small", "pythia-1b"] = "both"  # which models to measure (both: the
                                   # first two)
    batch_size: int = 8            # prompts per batch (sampler and RL iteration)
    minibatch_size: int = 0        # responses per gradient step (0: batch_size // 2)
    prompt_len: int = 16           # longest prompt; the others are shorter, so the batch is left-padded
    max_new_tokens: int = 32       # tokens sampled per prompt
    rounds: int = 3                # interleaved sampler rounds (each: the three samplers, the order rotating)
    iters: int = 2                 # timed RL iterations, after one untimed
    epochs: int = 1                # update epochs per RL iteration (train.py's default is 4)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # as train.py's: auto is bf16 on cuda, fp32 on a CPU
    lora_r: int = 0                # LoRA's rank, as train.py's --lora_r (0: a full fine-tune)
    grad_checkpointing: bool = False  # as train.py's
    cuda_graph: bool = False       # as train.py's: the RL iteration's sampler on a GPU is the CUDA graph's
    profile: bool = False          # print torch.profiler's table of one more update
    seed: int = 0                  # seeds weights, prompts and sampling
    reward_model: bool = False     # measure instead an RL iteration against a tiny reward model and against the rule
    sft_dir: str = "out/sft"       # with --reward_model: the cache of the tiny GPT pre-trained as pi_init


CONTEXT = {"tiny": train.Config().block_size, "gpt2-small": GPT2Config().n_positions, "pythia-1b": 2048}  # positions


def validate(args):
    """Refuse flags that mean nothing, saying why, before a model is built."""
    cli.check_rules(args, [  # (flag, holds, what it must be)
        ("batch_size", args.batch_size > 0, "> 0"),
        ("minibatch_size", 0 <= args.minibatch_size <= args.batch_size and (args.minibatch_size == 0 or
                                                                           args.batch_size % args.minibatch_size == 0),
         "0 or a divisor of batch_size"),
        ("prompt_len", args.prompt_len >= 2, ">= 2 (prompts have prompt_len // 2 to prompt_len tokens, at least one)"),
        ("max_new_tokens", args.max_new_tokens > 0, "> 0"),
        ("rounds", args.rounds >= 0, ">= 0 (the ratio is a median over rounds; 0: no sampler comparison)"),
        ("lora_r", args.lora_r >= 0, ">= 0 (0: no LoRA)"),
        ("iters", args.iters > 0, "> 0 (timed iterations)"),
        ("epochs", args.epochs > 0, "> 0"),
        ("seed", args.seed >= 0, ">= 0"),
        ("rounds", args.rounds >= 1 or not args.reward_model, ">= 1 with --reward_model (its ratio is a median over "
                                                              "the rounds)"),
        ("sft_dir", args.sft_dir != "", "a folder (the cache of the pre-trained tiny GPT)"),
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


def make_model(name, device):
    """Random weights, built on the device (the 1B shape in seconds on a GPU)."""
    with torch.device(device):
        if name == "tiny":
            return model.tiny_gpt(train.Config(), data.task_encoding().n_vocab)
        if name == "gpt2-small":
            return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # GPT-2 small's shape
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=ROWS, max_position_embeddings=2048, rotary_pct=0.25,
                                                **SHAPES["pythia-1b"]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_samplers(args, cfg, lm, enc, device):
    """Tokens/s of the static sampler (a CUDA graph on a GPU; on a CPU the same static cache without one), of
    generate()'s eager loop and of transformers' generate, interleaved (the order rotates each round), and the
    median ratios of the first two to the third."""
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,)).tolist()
    prompts = [torch.randint(enc.n_vocab - 1, (n,)).tolist() for n in lengths]
    ids, mask = model.left_pad(prompts, enc.eot_token, device)            # (B, P)

    def static():
        response, _, logprobs = generate_static(lm, ids, mask, args.max_new_tokens, enc.eot_token, enc.n_vocab,
                                              graph=device.type == "cuda")
        return response.shape[1]

    def eager():
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

    samplers = [static, eager, theirs]
    for fn in samplers:
        tokens_per_s(fn)                                                 # warm-up (the graph's capture)
    rates = {fn: [] for fn in samplers}
    for r in range(args.rounds):
        for fn in samplers[r % 3:] + samplers[:r % 3]:
            rates[fn].append(tokens_per_s(fn))
    return ([statistics.median(rates[fn]) for fn in samplers] +
            [statistics.median(a / b for a, b in zip(rates[fn], rates[theirs])) for fn in (static, eager)])


def time_iterations(args, cfg, lm, enc, device):
    """Seconds per RL iteration in generation, scoring forwards and update (medians of args.iters), and the
    update's FLOPs (matrix products and attention, counted by torch's FlopCounterMode in the untimed first one)."""
    prompts = [" ".join(str(t) for t in torch.randint(enc.n_vocab - 1, (n,)).tolist())
               for n in torch.randint(args.prompt_len // 2, args.prompt_len + 1, (64,)).tolist()]
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    policy, ref_lm = lora.make_policy(cfg, lm, enc.n_vocab, device)    # as train.py builds them
    opt = model.make_optimizer(policy, cfg.lr, device)
    generate, gen_s = choose_sampler(cfg, device), []

    def timed_generate(*a, **k):                                        # the rollout's sampler, timed
        sync(device)
        t0 = time.perf_counter()
        out = generate(*a, **k)
        sync(device)
        gen_s.append(time.perf_counter() - t0)
        return out
    rows, flops = [], FlopCounterMode(display=False)
    for it in range(args.iters + 1):
        t0 = time.perf_counter()
        batch, P, _, _ = train.rollout(cfg, policy, ref_lm, prompt_tokens, prompts, length_reward,
                                       functools.partial(model.sample, cfg, enc=enc, device=device, generate=timed_generate))
        sync(device)
        t1 = time.perf_counter()
        with flops if it == 0 else contextlib.nullcontext():
            train.update(cfg, policy, opt, batch, P)
        sync(device)
        rows.append((gen_s[-1], t1 - t0 - gen_s[-1], time.perf_counter() - t1))
    if args.profile:
        profile_update(cfg, policy, opt, batch, P, device)
    return [statistics.median(col) for col in zip(*rows[1:])] + [flops.get_total_flops()]


def profile_update(cfg, policy, opt, batch, P, device):
    """torch.profiler over one more update: the operations that take the most time on the device (on a CPU: of
    the host), and how busy the device was."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                                                          else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        train.update(cfg, policy, opt, batch, P)
        sync(device)
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6   # microseconds -> s
        print(f"update under the profiler: {wall:.3f} s, device busy {busy:.3f} s ({100 * busy / wall:.0f}%)")


def matmul_peak(cfg, device):
    """TFLOP/s of a large matrix product in the run's precision (bf16 or fp32): the ceiling the update is held to."""
    n, dtype = 8192 if device.type == "cuda" else 1024, torch.bfloat16 if model.bf16(cfg, device) else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def measure(args):
    device = model.get_device(args)
    cfg = train.resolve(train.Config(
        batch_size=args.batch_size, minibatch_size=args.minibatch_size or max(1, args.batch_size // 2),
        epochs=args.epochs, max_new_tokens=args.max_new_tokens, device=args.device, precision=args.precision,
        lora_r=args.lora_r, grad_checkpointing=args.grad_checkpointing, cuda_graph=args.cuda_graph,
        target_kl=0.0))                                                  # no guard: every update takes all its steps
    names = ["tiny", "gpt2-small"] if args.models == "both" else [args.models]
    peak = matmul_peak(cfg, device)
    print(f"device {device} | batch {args.batch_size} | prompts <= {args.prompt_len} tokens | {args.max_new_tokens} "
          f"new tokens | RL iteration: {cfg.epochs} epoch(s) of minibatches of {cfg.minibatch_size}, sampled with "
          f"{'the CUDA graph' if choose_sampler(cfg, device) is generate_static else 'the eager loop'} | "
          f"bf16 autocast: {model.bf16(cfg, device)}" + (f" | LoRA r {cfg.lora_r}" if cfg.lora_r else " | full fine-tune")
          + (" | activation checkpointing" if cfg.grad_checkpointing else "") + f" | matmul peak {peak:.3g} TFLOP/s")
    lines = ["| model | params | static tok/s | eager tok/s | generate tok/s | static / generate | eager / generate "
             "| generation s/iter | scoring s/iter | update s/iter | update TFLOP/s | of peak | peak memory GB |",
             "|---" * 13 + "|"]
    for name in names:
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lm = make_model(name, device).eval()
        enc = IdsTokenizer(lm.config.vocab_size)
        t0 = time.time()
        static, eager, theirs, static_ratio, eager_ratio = (time_samplers(args, cfg, lm, enc, device) if args.rounds
                                                             else (math.nan,) * 5)
        gen, score, upd, flops = time_iterations(args, cfg, lm, enc, device)
        params = sum(p.numel() for p in lm.parameters()) / 1e6
        tflops = flops / upd / 1e12
        lines.append(f"| {name} | {params:.2f}M | {static:,.0f} | {eager:,.0f} | {theirs:,.0f} | {static_ratio:.2f}x "
                     f"| {eager_ratio:.2f}x | {gen:.3f} | {score:.3f} | {upd:.3f} | {tflops:.3g} | {100 * tflops / peak:.0f}% "
                     f"| {model.peak_memory_mb(device) / 2**10:.2f} |")
        print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
        del lm
    print("\n".join(lines))
    return lines


def time_reward_model(args):
    """Seconds per RL iteration of train.py's defaults on the embedded task against the rule (data.sentiment_reward)
    and against a tiny reward model (reward_model.py's: pi_init's network with one output, saved and loaded back by
    lab/hf.py as train.py loads it), args.rounds rounds interleaved, after one untimed iteration each."""
    import tempfile

    import reward_model
    from lab import hf, runs
    device, enc = model.get_device(args), data.task_encoding()
    cfg = train.resolve(train.Config(device=args.device, sft_dir=args.sft_dir, seed=args.seed))
    prompts = data.task_prompts()
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    lm = runs.load_pi_init(cfg, enc, prompt_tokens, [], device)
    model.set_cpu_threads(cfg, device)
    with tempfile.TemporaryDirectory() as folder:
        reward_model.reward_model_from(lm, enc.eot_token).save_pretrained(folder)
        rewards = {"rule": data.sentiment_reward, "reward model": hf.reward_model_fn(folder, enc, device)}
        torch.manual_seed(args.seed)
        policy, ref_lm = lora.make_policy(cfg, lm, enc.n_vocab, device)
        opt = model.make_optimizer(policy, cfg.lr, device)
        times = {name: [] for name in rewards}
        for r in range(args.rounds + 1):
            for name, reward_fn in (rewards.items() if r % 2 else reversed(rewards.items())):
                sync(device)
                t0 = time.perf_counter()
                batch, P, _, _ = train.rollout(cfg, policy, ref_lm, prompt_tokens, prompts, reward_fn,
                                               train.make_sampler(cfg, enc, device))
                train.update(cfg, policy, opt, batch, P)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    ratios = [m / r for m, r in zip(times["reward model"][1:], times["rule"][1:])]
    line = (f"RL iteration on the embedded task ({cfg.batch_size} responses, {cfg.epochs} epochs, device {device}, "
            f"{args.rounds} rounds): rule {statistics.median(times['rule'][1:]):.3f} s | reward model "
            f"{statistics.median(times['reward model'][1:]):.3f} s | ratio {statistics.median(ratios):.2f}x "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(line)
    return statistics.median(ratios)


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback)."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with cli.one_line_errors():
        args = cli.parse_args(Bench, sys.argv[1:] if argv is None else argv, __doc__)
        validate(args)
        return time_reward_model(args) if args.reward_model else measure(args)


if __name__ == "__main__":
    main()
