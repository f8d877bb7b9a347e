"""
The command line of train.py and of the scripts in experiments/: flags generated from a config dataclass, checks of a
config's values, failures that end in one line, and train.py's header line and its line for each iteration.
"""
import argparse
import contextlib
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import typing
from typing import Literal

import torch.distributed as dist

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
    """The text of a message on one line, cut to at most limit characters. Messages of other libraries are long
    and span lines; ours quote them inside one line."""
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
# train.py's lines


def header(cfg, policy, opt, prompts, eval_prompts, device, jstar, space):
    """train.py's first line: what trains, on what data and device, and the optimum J* it can reach."""
    size = sum(p.numel() for p in policy.parameters()) / 1e6
    trains = sum(p.numel() for group in opt.param_groups for p in group["params"]) / 1e6  # what Adam steps
    return (f"{cfg.algo} | lambda {cfg.lam} | lr {cfg.lr:g} | " + (f"{size:.2f}M parameters" if not cfg.lora_r else
            f"LoRA r {cfg.lora_r}: {trains:.2f}M of {size:.2f}M parameters train")
            + f" | {len(prompts)} prompts" + (f" ({len(eval_prompts)} held out)" if eval_prompts else "")
            + (f" | judge {cfg.gold_fn}" if cfg.gold_fn else "")
            + (f" | evaluator {cfg.evaluator}" if cfg.evaluator else "")
            + f" | device {device}"
            + (f" x {dist.get_world_size()} processes" if dist.is_initialized() else "")
            + (f" | J* {jstar[0]:.4f} +- {jstar[1]:.4f}" if jstar else "")
            + (f" | exact evaluation of {space['rewards'].numel()} responses" if space else ""))


LOGGED = [("reward", ".3f"), ("gold", ".3f"), ("evaluator", ".3f"), ("kl", ".3f"), ("J", ".3f"), ("gap", ".3f"),
          ("entropy", ".2f"), ("distinct2", ".2f"), ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("vf_loss", ".4f"),
          ("gap_exact", ".4f"), ("gold_lost_exact", ".4f"), ("eval_reward", ".3f"), ("eval_gold", ".3f"),
          ("eval_evaluator", ".3f"), ("eval_kl", ".3f"), ("mem_mb", ".0f")]  # the log line's statistics, in order


def log_line(cfg, stats, samples=()):
    """train.py's line for one iteration: the statistics it has, whether the KL guard stopped the update, the time;
    every sample_every iterations, four of the rollout's samples (prompt, completion, reward, kl) on lines below it."""
    shown = samples[:4] if cfg.sample_every and stats["iter"] % cfg.sample_every == 0 else []
    return (f"iter {stats['iter']}/{cfg.iters} | "
            + " | ".join(f"{k} {stats[k]:{fmt}}" for k, fmt in LOGGED if k in stats)
            + (f" | target_kl: stopped at approx_kl {stats['kl_stop']:.3f} after {stats['steps']}/"
               f"{cfg.epochs * (cfg.batch_size // cfg.minibatch_size)} steps" if "kl_stop" in stats else "")
            + f" | {stats['ms']:.0f}ms"
            + "".join(f"\n    {prompt!r} -> {completion!r} | reward {score:+.2f} | kl {kl:.2f}"
                      for prompt, completion, score, kl in shown))
