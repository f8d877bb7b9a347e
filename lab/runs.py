"""
The run folder (out_dir): metrics.jsonl, config.json, checkpoints that resume a run exactly, the trained policy
and --sample, which reads it, an earlier run kept aside, and a lock so that one run at a time uses a folder; and
pi_init, --init's checkpoint or the tiny GPT pre-trained once and cached in sft_dir. Every file is written under a
temporary name and then renamed, so a crash, Ctrl-C or a full disk never leaves half a file. docs/runs.md lists
what this guarantees and the tests that hold it.
"""
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from data import call_reward, load_reward_fn, task_prompts
from lab.checks import check_fits
from lab.ddp import gather_all, rank, world_size
from lab.hf import (HFTokenizer, load_config, load_lm, load_pretrained, load_tokenizer, quiet, reward_model_fn,
                    ships_tokenizer)
from lab.static_sampler import choose_sampler
from model import get_device, pretrain, sample, tiny_gpt_config

RESUME_MAY_CHANGE = {"iters", "lr", "out_dir", "sft_dir", "sample_every", "ckpt_every", "max_bad_steps", "resume",
                     "device", "precision", "sample", "prompt", "num_samples", "exact_every", "eval_prompts",
                     "eval_every", "eval_samples", "grad_checkpointing", "cuda_graph", "threads", "gold_fn",
                     "evaluator"}  # others mix two runs


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


def exchange(a, b):
    """Swap the folders a and b in one step (Linux's renameat2 with RENAME_EXCHANGE): at every instant each name
    holds one of the two folders, whole. False where the system cannot (another OS, an old kernel or file system)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def remove_stale(path):
    """Remove the temporaries that replace_folder(path) left when its process was killed (SIGKILL runs no clean-up):
    path.tmpPID and path.oldPID of a process that no longer runs."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder):
        m = re.fullmatch(re.escape(name) + r"\.(?:tmp|old)(\d+)", entry)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)                                  # raises if no such process
        except ProcessLookupError:
            if entry.startswith(f"{name}.old") and not os.path.exists(path):
                os.replace(os.path.join(folder, entry), path)            # killed between its two renames: put back
            else:
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        except OSError:                                                  # it runs, as another user
            pass


def replace_folder(path, write):
    """write(tmp) to a temporary folder, then put it at path in one step, whatever folder path held: a kill at any
    moment leaves at path the earlier folder or the new one, whole. The earlier folder is then removed, and so are
    the temporaries of a killed earlier call (remove_stale). Where the system cannot swap two folders in one step,
    the earlier folder is first renamed to path.oldPID: a kill between the two renames leaves both there."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale(path)
    tmp = path + f".tmp{os.getpid()}"
    try:
        write(tmp)
        if not os.path.isdir(path):
            os.replace(tmp, path)
        elif exchange(tmp, path):                                        # tmp now holds the earlier folder
            shutil.rmtree(tmp)
        else:
            old = f"{path}.old{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fingerprint(path):
    """What identifies a model folder's contents, cheaply: a hash of each file's name, size and modification time
    (training a model again into the folder changes them). None for a path that is no folder (a hub id)."""
    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# pi_init


def load_pi_init(cfg, enc, prompt_tokens, eval_tokens, device):
    """pi_init, frozen: --init's checkpoint, or the tiny GPT pre-trained by model.pretrain, once: it is cached in
    sft_dir. Its config is read first, so that prompts too long for its context window or a tokenizer it does not
    fit stop the run before any pre-training or download of weights."""
    config = load_config(cfg.init) if cfg.init else tiny_gpt_config(cfg, enc.n_vocab)
    check_fits(enc, prompt_tokens, cfg.max_new_tokens, config)
    check_fits(enc, eval_tokens, cfg.max_new_tokens, config, "held-out prompt")
    lm = (load_lm(cfg.init, "--init") if cfg.init else cached_pretrain(cfg, enc, device)).to(device)
    return lm.eval().requires_grad_(False)


def cached_pretrain(cfg, enc, device):
    """model.pretrain's tiny GPT, cached in cfg.sft_dir, keyed by the tokenizer, the model's shape, the steps and the
    learning rate. A damaged cache is pre-trained again; runs that build it at once each write their own."""
    path = os.path.join(cfg.sft_dir, f"{enc.name}_V{enc.n_vocab}_L{cfg.n_layer}_H{cfg.n_head}_D{cfg.n_embd}_"
                                     f"C{cfg.block_size}_S{cfg.sft_steps}_lr{cfg.sft_lr:g}")
    if os.path.isdir(path):
        try:
            return load_pretrained(GPT2LMHeadModel, path, "the pi_init cache").to(device)
        except ValueError as e:
            print(f"warning: {e}: pre-training it again")
        shutil.rmtree(path, ignore_errors=True)
    lm = pretrain(cfg, enc, device)
    try:
        with quiet():
            write_atomically(path, lm.save_pretrained)                    # runs may build it at once: each its own tmp
    except OSError as e:
        if not os.path.isdir(path):                                      # else another run cached it first: use ours
            raise OSError(f"could not write the pi_init cache {path} ({e.strerror or e}): nothing was cached") from e
    return lm


# ---------------------------------------------------------------------------------------------
# the run folder


def write_config(path, cfg):
    """The run's config as JSON: beside metrics.jsonl (experiments/compare.py --plot reads it) and in policy/ (--sample)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    write_atomically(path, write)


def append_metrics(cfg, stats):
    """One iteration's line of out_dir/metrics.jsonl. The first iteration of a fresh run first moves an earlier run's
    results aside and starts the file afresh, then writes config.json beside it (what made these metrics)."""
    first = stats["iter"] == 1
    if first:
        keep_previous_run(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w" if first else "a") as f:
        f.write(json.dumps(stats) + "\n")
    if first:
        write_config(os.path.join(cfg.out_dir, "config.json"), cfg)


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


# ---------------------------------------------------------------------------------------------
# checkpoints: --resume continues a run exactly


def frozen(policy):
    """The names of the weights that do not train (LoRA's base): checkpoints leave them out. A weight tied to another
    (GPT-2's LM head and token embedding) has two names in state_dict(): both are here."""
    return {n for n, p in policy.named_parameters(remove_duplicate=False) if not p.requires_grad}


def save_checkpoint(cfg, policy, opt, iteration, metrics_line):
    """out_dir/ckpt.pt: everything to continue exactly: the weights that train, optimizer, RNG states, iteration (= lines
    of metrics.jsonl), the config and the last line of metrics.jsonl (to check both on resume). Written to a temporary
    file, then renamed. Data parallel: every process calls it (its random state), rank 0 writes."""
    if not all(torch.isfinite(p).all() for p in policy.parameters()):
        raise FloatingPointError("non-finite weights: checkpoint not written")
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    skip = frozen(policy)
    state = {"policy": {k: v for k, v in policy.state_dict().items() if k not in skip}, "opt": opt.state_dict(),
             "iter": iteration, **rng,
             "config": dataclasses.asdict(cfg), "metrics_line": metrics_line,
             "reward_model_fingerprint": fingerprint(getattr(cfg, "reward_model", ""))}
    if dist.is_initialized():
        state["ranks_rng"] = gather_all([rng])                           # every process's, in rank order
    if rank() != 0:
        return
    try:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "there is no earlier checkpoint"
        raise OSError(f"could not write checkpoint {path} at iteration {iteration} ({e.strerror or e}): {kept}") from e


def checkpoint_to_resume(cfg, resolve):
    """With --resume, the checkpoint of out_dir, checked (read_checkpoint); None for a fresh run."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    return read_checkpoint(path, os.path.join(cfg.out_dir, "metrics.jsonl"), cfg, resolve)


def read_checkpoint(path, metrics_path, cfg, resolve=lambda cfg: cfg):
    """The checkpoint to resume from, after checking that it is whole, that the config keeps what the run
    depends on (only RESUME_MAY_CHANGE may change), and that metrics.jsonl holds exactly the checkpoint's
    iterations (later lines are dropped). A field that the checkpoint lacks (it was written before the field
    existed) had its default then: resolve (train.resolve) fills in the defaults that depend on other fields."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        iteration, saved, last_line = state["iter"], state["config"], state["metrics_line"]
        fields = dataclasses.asdict(cfg)
        then = dataclasses.asdict(resolve(type(cfg)(**{k: v for k, v in saved.items() if k in fields})))
    except Exception as e:
        raise ValueError(f"{path} is damaged or not a checkpoint of this train.py ({type(e).__name__}: {e}); "
                         "a run without --resume starts afresh and keeps it in previous/") from None
    changed = [f"{k} {then[k]!r}{'' if k in saved else ' (its default: the checkpoint predates the field)'} -> {v!r}"
               for k, v in fields.items() if k not in RESUME_MAY_CHANGE and then[k] != v]
    if changed:
        raise ValueError(f"--resume would mix two runs: {', '.join(changed)} (a resumed run may change only "
                         f"{', '.join(sorted(RESUME_MAY_CHANGE))})")
    now = fingerprint(getattr(cfg, "reward_model", ""))
    if state.get("reward_model_fingerprint", now) != now:               # the same path, another model in it
        raise ValueError(f"--resume would mix two rewards: the reward model {cfg.reward_model} changed since {path} "
                         "was written (trained again?); a run without --resume starts afresh and keeps it in previous/")
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


def resume(state, policy, opt, cfg):
    """The iteration the run starts from: 0 for a fresh run (state None), else the checkpoint's, after loading its
    weights, optimizer and random state and cutting metrics.jsonl back to its iteration."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if state is None:
        if cfg.resume and rank() == 0:
            print(f"no checkpoint in {cfg.out_dir}: starting afresh")
        return 0
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
    if rank() == 0:
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(line + "\n" for line in state["metrics_lines"])
        write_atomically(os.path.join(cfg.out_dir, "metrics.jsonl"), write)
        print(f"resumed from {os.path.join(cfg.out_dir, 'ckpt.pt')} at iteration {state['iter']}")
    return state["iter"]


# ---------------------------------------------------------------------------------------------
# the end of a run, and runs side by side


def save_policy(cfg, policy, enc):
    """out_dir/policy: the trained policy as a Hugging Face folder that from_pretrained and --sample load (with LoRA:
    the adapters merged in, and the adapters alone in policy/adapter), its tokenizer if it has its own, the value
    head, and the run's config (its tokenizer and reward, for --sample)."""
    folder, lm = os.path.join(cfg.out_dir, "policy"), policy.lm
    with quiet():                                                        # no progress bar in the log
        if cfg.lora_r:
            lm.save_pretrained(os.path.join(folder, "adapter"))
            lm = lm.merge_and_unload()                                   # into a plain model: from_pretrained loads it
        lm.save_pretrained(folder)
        if isinstance(enc, HFTokenizer):                                 # from_pretrained finds the tokenizer too
            enc.tok.save_pretrained(folder)
    torch.save(policy.v_head.state_dict(), os.path.join(folder, "value_head.pt"))
    write_config(os.path.join(folder, "apa_config.json"), cfg)


@torch.no_grad()
def sample_policy(cfg, Config):
    """`python train.py --sample=out/policy --prompt="the movie was"`: completions of a trained policy with
    their reward, using the tokenizer and reward of its run (read from apa_config.json beside it, into train.Config).
"""
    config_path = os.path.join(cfg.sample, "apa_config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{cfg.sample} holds no trained policy ({config_path} is missing)")
    try:
        with open(config_path) as f:
            run = Config(**json.load(f))
    except (ValueError, TypeError) as e:                                 # not JSON, not an object, unknown fields
        raise ValueError(f"{config_path} is damaged ({e}): it is written by train.py at the end of a run") from None
    if run.init and not run.tokenizer and ships_tokenizer(cfg.sample):  # the tokenizer saved beside it
        run = dataclasses.replace(run, init=cfg.sample)
    device = get_device(cfg)
    enc = load_tokenizer(run)
    reward_fn = reward_model_fn(run.reward_model, enc, device) if run.reward_model else load_reward_fn(run.reward_fn)
    lm = load_pretrained(AutoModelForCausalLM, cfg.sample, "--sample").to(device).eval()
    task = task_prompts()
    prompts = [cfg.prompt] * cfg.num_samples if cfg.prompt else [task[i % len(task)] for i in range(cfg.num_samples)]
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    check_fits(enc, prompt_tokens, run.max_new_tokens, lm.config)
    torch.manual_seed(cfg.seed)
    *_, completions = sample(run, lm, range(len(prompts)), prompt_tokens, enc, device, choose_sampler(run, device))
    scores = call_reward(run, reward_fn, prompts, completions)                # (B,)
    for prompt, completion, score in zip(prompts, completions, scores.tolist()):
        print(f"{prompt!r} -> {completion!r} | reward {score:+.2f}")
    return completions, scores.tolist()


def interrupted(cfg):
    """What Ctrl-C prints: whether a checkpoint is there to resume from."""
    path = cfg and os.path.join(cfg.out_dir, "ckpt.pt")
    return "interrupted: " + (f"{path} is intact; the same command with --resume=1 continues from it"
                              if path and os.path.exists(path) else "no checkpoint yet, nothing to resume")


@contextlib.contextmanager
def exclusive(out_dir):
    """One run at a time in out_dir: a lock on the folder, which the system releases when the process ends,
    however it ends (even by SIGKILL), so no lock is ever left behind. Under torchrun, rank 0 holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
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
