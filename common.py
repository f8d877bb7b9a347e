"""
What train.py, compare.py and bench.py share that is not the algorithm: the command line, generated from
a config dataclass; progress lines; data-parallel helpers (torchrun); and the run folder: checkpoints that
resume exactly, an earlier run kept aside, one run at a time in a folder.
"""
import argparse
import contextlib
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
from typing import Literal

import torch
import torch.distributed as dist

from ppo import masked_mean

# ---------------------------------------------------------------------------------------------
# command line: every field of a config dataclass is a flag


class ArgumentError(ValueError):
    """A bad command line; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):                                            # argparse would print usage and exit 2
        raise ArgumentError(message)


def parse_args(cls, argv, doc=""):
    """An instance of the dataclass `cls` from flags, with argparse: every field is a flag, `--name value`
    or `--name=value`; the comment after a field is its help text, `# --- name` comments group the flags;
    a Literal type gives the choices; a bool is a bare flag (`--resume`) or takes true/false/1/0; `X | None`
    takes an X (None: a default that depends on other flags)."""
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
            kind = dict(type=f.type, metavar=getattr(f.type, "__name__", "").upper())
            if type(None) in typing.get_args(f.type):                    # X | None: an X, or None by default
                inner = next(t for t in typing.get_args(f.type) if t is not type(None))
                kind = dict(type=inner, metavar=inner.__name__.upper())
            elif typing.get_origin(f.type) is Literal:
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


def check_rules(cfg, rules):
    """Refuse a config that means nothing, saying why: every float finite, then each rule of
    rules, a list of (field, holds, what it must be)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
    for name, holds, what in rules:
        if not holds:
            raise ValueError(f"{name} must be {what}, got {getattr(cfg, name)!r}")


def parse_bool(text):
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""


def one_line(text, limit=None):
    """A message (an exception's too) on one line, cut to limit characters: another library's words inside ours."""
    return " ".join(str(text).split())[:limit]


@contextlib.contextmanager
def one_line_errors(interrupted=lambda: "interrupted"):
    """For a script's main(): every failure ends in one line `error: ...` on stderr and exit status 1
    (APA_DEBUG=1: the traceback instead); Ctrl-C in exit status 130 and the line interrupted() returns."""
    try:
        yield
    except KeyboardInterrupt:
        print("\n" + interrupted(), file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("APA_DEBUG", "0") not in ("", "0"):
            raise
        expected = isinstance(e, (ValueError, OSError, FloatingPointError))
        text = str(e) if expected else f"{type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)"
        raise SystemExit("error: " + one_line(text)) from None          # one line, whatever the message


# ---------------------------------------------------------------------------------------------
# progress


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


# ---------------------------------------------------------------------------------------------
# data parallel: under torchrun, one process per device, each with its share of every batch. Every
# token-level mean is taken over all processes' tokens, so the algorithm is the one-process one.


def init_distributed(cfg, device):
    """Join torchrun's process group: cuda:LOCAL_RANK with NCCL on GPUs, else the CPU with gloo."""
    world = int(os.environ["WORLD_SIZE"])
    if cfg.batch_size % world or cfg.minibatch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} and minibatch_size {cfg.minibatch_size} must be "
                         f"divisible by the number of processes, {world}")
    if (cfg.batch_size // world) % cfg.group_size:                      # a group's k responses stay in one process
        raise ValueError(f"batch_size / processes = {cfg.batch_size // world} is not divisible by group_size "
                         f"{cfg.group_size}")
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


def peak_memory_mb(device):
    """cuda: the most memory tensors held since the last reset (max_memory_allocated). cpu: the process's
    peak resident set size so far (ru_maxrss, in KiB on Linux), which never goes down."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# ---------------------------------------------------------------------------------------------
# the run folder: its config, checkpoints, an earlier run, a lock


def write_atomically(path, write):
    """write(tmp) to a temporary file or folder of this process, then rename it to path: path is whole or as it
    was, never half-written, even if the process dies midway. On any failure the temporary is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_config(path, cfg):
    """The run's config as JSON: beside metrics.jsonl (compare.py --plot reads it) and in policy/ (--sample).
    Written atomically: a run killed meanwhile leaves no half-written config."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    write_atomically(path, write)


def frozen(policy):
    """The names of the weights that do not train (LoRA's base): checkpoints leave them out."""
    return {n for n, p in policy.named_parameters() if not p.requires_grad}


def save_checkpoint(path, policy, opt, iteration, cfg, metrics_line):
    """Everything to continue exactly: the weights that train, optimizer, RNG states, iteration (= lines of metrics.jsonl), the
    config and the last line of metrics.jsonl (to check both on resume). Written to a temporary file, then
    renamed, so a crash or a full disk never leaves a half-written checkpoint. Data parallel: every process
    calls it, rank 0 writes."""
    if not all(torch.isfinite(p).all() for p in policy.parameters()):
        raise FloatingPointError("non-finite weights: checkpoint not written")
    rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"policy": {k: v for k, v in policy.state_dict().items() if k not in frozen(policy)}, "opt": opt.state_dict(),
             "iter": iteration, **rng,
             "config": dataclasses.asdict(cfg), "metrics_line": metrics_line}
    if dist.is_initialized():
        state["ranks_rng"] = gather_all([rng])                           # every process's, in rank order
    if rank() != 0:
        return
    try:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "there is no earlier checkpoint"
        raise OSError(f"could not write checkpoint {path} at iteration {iteration} ({e.strerror or e}): {kept}") from e


def read_checkpoint(path, metrics_path, cfg, may_change):
    """The checkpoint to resume from, after checking that it is whole, that the config keeps what the run
    depends on, and that metrics.jsonl holds exactly the checkpoint's iterations (later lines are dropped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        iteration, saved, last_line = state["iter"], state["config"], state["metrics_line"]
    except Exception as e:
        raise ValueError(f"{path} is damaged or not a checkpoint of this train.py ({type(e).__name__}: {e}); "
                         "a run without --resume starts afresh and keeps it in previous/") from None
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in may_change and saved[k] != v]
    if changed:
        raise ValueError(f"--resume would mix two runs: {', '.join(changed)} (a resumed run may change only "
                         f"{', '.join(sorted(may_change))})")
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
        missing, unexpected = policy.load_state_dict(state["policy"], strict=False)
    except RuntimeError as e:
        problem = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e))
        raise ValueError(f"the checkpoint does not fit this model: {problem}") from None
    missing = set(missing) - frozen(policy)                             # not saved: read again from --init
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit this model: it lacks {sorted(missing)[:2]} and has "
                         f"{sorted(unexpected)[:2]} (another --lora_r?)")
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
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(line + "\n" for line in state["metrics_lines"])
    write_atomically(metrics_path, write)
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
