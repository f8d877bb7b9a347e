"""
The paper's experiment on the embedded task, and the comparison people make today: APA (this project's exact
form, the paper's literal form, bounded, and with the KL guard), PPO, AWR, GRPO, Dr. GRPO and RLOO, with the same
lambda, reward and sample budget, over seeds and learning rates. Results and their reading: docs/experiments.md.

Paper: Zhu et al. 2023, arXiv 2306.02231, Sec. 5 (APA against PPO and AWR on HH and StackExchange).
Run:  python -m experiments.compare            the tables and plots of docs/experiments.md (132 runs: 73 minutes on 2 cores)
      python -m experiments.compare --quick=1  a smoke test of the whole pipeline on a tiny model (about 30 s)
      python -m experiments.compare --settings=paper   the paper's regime (36 runs: 55 minutes on 2 busy cores)
      python -m experiments.compare --plot=out/metrics.jsonl   reward, KL and gap against samples for any runs (metrics
                                       files or run folders, comma-separated; a half-written last line is skipped)

What it runs. Every run is train.train with a Config; nothing of training is written here.
1. main: the algorithms at lr `lr` for `iters` iterations, `seeds` seeds: the table and the learning curves.
2. grid: the algorithms at each lr of `lrs` for `grid_iters` iterations: the stability map (final gap against lr).
   A grid run at `lr` is the first `grid_iters` iterations of the main run.
3. short: responses of `short_tokens` tokens, where train.py logs the exact gap, and the table "which
   algorithms reach pi*".
4. kl: GRPO, Dr. GRPO and RLOO with each other place for the KL (--kl), as the short setting runs them.
5. rm (not among the defaults): RL against a reward model learned from preferences, judged by the task's reward, at
   several lambdas: over-optimisation measured exactly (rm.md and rm.png; the section "the rm setting" below).
6. paper (not among the defaults): the paper's regime, 20-token responses against a learned reward model for a fixed
   budget, judged by a second reward model and by the task's reward (paper.md and paper.png; "the paper setting" below).
--settings chooses among them. ALGOS lists the algorithms (ONLY: those that run in some settings only). Each run lives in
out_dir/<setting>/<algo>_lr<lr>_seed<seed>/. A run whose metrics.jsonl holds the iterations asked for is not run
again, and an interrupted one resumes from its checkpoint, so the same command continues a stopped sweep. Runs go
`workers` at a time, one thread each, and one sweep at a time in an out_dir (lab/runs.py's lock). Every failure ends
in one line `error: ...` (APA_DEBUG=1: the traceback).
Where this departs from the paper: a 0.44M-parameter GPT, a word-list reward, 40 prompts, Adam at 3e-5 to 3e-4
(the authors: 125M-6B models, a learned reward model, HH data, AdamW at 1e-6); docs/experiments.md lists the rest.
"""
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class CompareConfig:
    out_dir: str = "out/compare"       # one folder per run below it, and compare.md and the plots
    sft_dir: str = "out/sft"           # cache of pi_init, shared with train.py
    seeds: int = 3                     # seeds 0 .. seeds-1 for every setting
    lr: float = 3e-5                   # learning rate of the main table (train.py's default)
    iters: int = 300                   # iterations of the main table
    lrs: str = "3e-5,1e-4,3e-4"        # learning rates of the stability map
    grid_iters: int = 100              # iterations of each run of the stability map
    short_tokens: int = 2              # response length of the short-response setting
    short_iters: int = 150             # iterations of the short and kl settings' runs
    workers: int = 2                   # runs in parallel, one thread each
    settings: str = "main,grid,short,kl"  # the settings to run and tabulate: main, grid, short, kl, rm, paper
                                       # (comma-separated)
    rm_lams: str = "0.01,0.03,0.1,0.3"  # the rm setting: the lambdas of the runs against a learned reward model
    rm_iters: int = 150                # the rm setting: iterations of each run
    paper_lrs: str = "3e-5,1e-4,3e-4"  # the paper setting: its learning rates, from stable to unstable
    paper_iters: int = 150             # the paper setting: the fixed budget, iterations of each run
    paper_eval_every: int = 10         # the paper setting: held-out evaluation every N iterations
    paper_eval_samples: int = 128      # the paper setting: responses to the held-out prompts in each evaluation
    quick: bool = False                # tiny model, 1 seed, a few iterations: a smoke test of everything
    plot: str = ""                     # plot these metrics.jsonl files or run directories and exit
    run: bool = True                   # False: only the tables and plots, from the runs already done


ALGOS = {"apa": dict(algo="apa"), "apa_paper": dict(algo="apa", apa_form="paper"),
         "apa_bounded": dict(algo="apa", apa_clip=0.5), "apa_guard": dict(algo="apa", target_kl=0.2),
         "apa_authors": dict(algo="apa", apa_form="authors"), "ppo": dict(algo="ppo"), "awr": dict(algo="awr"),
         "grpo": dict(algo="grpo"),
         "drgrpo": dict(algo="grpo", grpo_std=False), "rloo": dict(algo="rloo")}  # train.Config overrides
NAMES = {"apa": "APA", "apa_paper": "APA (paper form)", "apa_bounded": "APA, bounded (c = 0.5)",
         "apa_guard": "APA + KL guard (0.2)", "apa_authors": "APA (authors' configuration)", "ppo": "PPO",
         "awr": "AWR", "grpo": "GRPO (k = {k})",
         "drgrpo": "Dr. GRPO (k = {k})", "rloo": "RLOO (k = {k})"}  # {k}: the run's group size
ONLY = {"apa_guard": ("grid",), "drgrpo": ("short",), "apa_authors": ("paper",)}  # the settings of these (and of
                                                       # the kl ones, below); every other runs in main, grid and short
KL_PLACES = {"reward": "in the reward", "k1": "k1 in the loss", "k2": "k2 in the loss", "k3": "k3 in the loss",
             "k3_is": "k3 x ratio in the loss"}        # train.py's --kl: where GRPO's and RLOO's KL goes
KL_DEFAULT = {"grpo": "k3", "drgrpo": "k3", "rloo": "reward"}  # their own (train.resolve's, a test checks): these
                                                       # runs are the short setting's
for _base in KL_DEFAULT:                               # the kl setting: every other place for each, 2-token responses
    for _kl in KL_PLACES:
        if _kl != KL_DEFAULT[_base]:
            ALGOS[f"{_base}_{_kl}"] = dict(ALGOS[_base], kl=_kl)
            NAMES[f"{_base}_{_kl}"] = f"{NAMES[_base]}, KL {KL_PLACES[_kl]}"
            ONLY[f"{_base}_{_kl}"] = ("kl",)
FIXED_POINT = {                                        # what each converges to, in theory (the tests that check it)
    "apa": "pi* (test_losses.py: test_token_mdp_apa_converges_to_optimum)",
    "apa_paper": "not pi*: pi_init exp(Q_R/lambda) per state, no KL of later tokens "
                 "(test_token_mdp_paper_form_misses_optimum)",
    "apa_bounded": "pi* (test_token_mdp_bounded_apa_converges_to_optimum)",
    "ppo": "pi*, with its advantages whitened as train.py runs it "
           "(test_ppo_with_whitened_advantages_steps_by_grad_j_over_t_std_and_stops_only_at_optimum)",
    "awr": "pi* (test_token_mdp_awr_converges_to_optimum_with_kl_reward)",
    "grpo": "not pi*: pi_init / (1 - W/lambda) per state, W scale-free (tests/test_grpo.py: "
            "test_bandit_grpo_fixed_point_ignores_the_scale_of_the_reward, k = 4; "
            "test_token_mdp_grpo_fixed_point_is_the_per_state_tilt_by_the_expected_group_advantage, k = 2)",
    "drgrpo": "not pi*: pi_init / (1 - (1 - 1/k)(Q_R - V_R)/lambda) per state "
              "(test_bandit_dr_grpo_fixed_point_is_a_hyperbolic_tilt_not_pi_star, k = 4; "
              "test_token_mdp_dr_grpo_fixed_point_is_the_per_state_tilt_by_the_score_advantage, k = 2)",
    "rloo": "pi* (test_token_mdp_rloo_converges_to_optimum)"}


BOTH = "test_bandit_fixed_point_of_each_place_for_the_kl; test_token_mdp_fixed_point_of_each_place_for_the_kl"
KL_FIXED_POINT = {                                     # (algo, --kl) -> the fixed point with responses of several
    ("rloo", "reward"): "pi* (test_token_mdp_rloo_converges_to_optimum)",   # tokens, in theory (the tests)
    ("drgrpo", "reward"): "pi*: its gradient is (1 - 1/k) grad J (test_bandit_fixed_point_of_each_place_for_the_kl; "
                          "test_token_mdp_gradient_with_the_kl_in_the_reward_is_grad_j_for_rloo_and_c_grad_j_for_dr_grpo)",
    ("grpo", "reward"): f"pi*, which the tests reach with decaying steps ({BOTH})",
    ("rloo", "k1"): "no pull towards pi_init: near-deterministic on a high-scoring response, not always the best "
                    "(test_token_mdp_k1_in_the_loss_pulls_nowhere_and_the_policy_turns_deterministic)",
    ("rloo", "k2"): "pi_init exp(Q_R/lambda) per state, no KL of later tokens (test_token_mdp_fixed_point_of_each_place_for_the_kl)",
    ("drgrpo", "k2"): "pi_init exp((1 - 1/k) Q_R/lambda) per state: no KL of later tokens, and the temperature "
                      f"lambda k/(k - 1) ({BOTH})",
    ("grpo", "k2"): f"pi_init exp(W/lambda) per state, W scale-free ({BOTH})",
    ("rloo", "k3"): f"pi_init / (1 - (Q_R - V_R)/lambda) per state ({BOTH})",
    ("drgrpo", "k3"): FIXED_POINT["drgrpo"], ("grpo", "k3"): FIXED_POINT["grpo"]}
for _base in KL_DEFAULT:                               # k1 pulls nowhere; k3 x ratio has k2's expected gradient
    KL_FIXED_POINT[_base, "k1"] = KL_FIXED_POINT["rloo", "k1"]
    KL_FIXED_POINT[_base, "k3_is"] = KL_FIXED_POINT[_base, "k2"].split(" (")[0].split(":")[0] + (
        " (the same expected gradient as k2 at each state: "
        "test_token_mdp_kl_estimators_expected_gradients_act_per_state_weighted_by_the_policys_visits; k2's: "
        "test_token_mdp_fixed_point_of_each_place_for_the_kl)")


def algos(setting):
    """The algorithms run in a setting: main, grid (the stability map), short or kl."""
    return [a for a in ALGOS if setting in ONLY.get(a, ("main", "grid", "short"))]


def name(algo, k=4):
    """What tables and plots call an entry of ALGOS; k: the group size of its runs (train.py's default: 4)."""
    return NAMES[algo].format(k=k)
QUICK = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=60, sft_lr=3e-3, batch_size=16,
             minibatch_size=8, epochs=2, jstar_samples=8, max_new_tokens=8, device="cpu")  # train.Config overrides of --quick


def validate(cfg):
    """Refuse settings that mean nothing, saying why, before any run starts."""
    from lab.cli import check_rules
    check_rules(cfg, [  # (field, holds, what it must be)
        ("seeds", cfg.seeds > 0, "> 0"),
        ("lr", 0 < cfg.lr <= 0.1, "in (0, 0.1] (train.py allows at most 0.1; at 0 nothing is learnt)"),
        ("iters", cfg.iters > 0, "> 0"),
        ("grid_iters", cfg.grid_iters > 0, "> 0"),
        ("short_tokens", cfg.short_tokens > 0, "> 0 (a response has at least one token)"),
        ("short_iters", cfg.short_iters >= 0, ">= 0 (0: no short responses)"),
        ("workers", cfg.workers > 0, "> 0"),
        ("out_dir", cfg.out_dir != "", "a folder"),
        ("sft_dir", cfg.sft_dir != "", "a folder"),
        ("settings", cfg.settings != "" and set(cfg.settings.split(",")) <= set(SETTINGS_RUN),
         f"a comma-separated choice of {', '.join(SETTINGS_RUN)}"),
        ("paper_iters", cfg.paper_iters > 0, "> 0"),
        ("paper_eval_every", 0 < cfg.paper_eval_every <= cfg.paper_iters,
         f"in [1, paper_iters={cfg.paper_iters}] (the paper setting's scores are held-out ones)"),
        ("paper_eval_samples", cfg.paper_eval_samples > 0, "> 0"),
    ])
    for flag, lrs in (("lrs", cfg.lrs), ("paper_lrs", cfg.paper_lrs)):
        for item in lrs.split(","):
            try:
                ok = 0 < float(item) <= 0.1             # False for nan and inf too
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{flag} must be comma-separated learning rates in (0, 0.1], got {item!r} in {lrs!r}")
    short = set(cfg.settings.split(",")) & {"short", "kl"}
    if short and not cfg.short_iters and not cfg.plot:   # they would plan no run, then find none to tabulate
        raise ValueError(f"--settings={cfg.settings} asks for {' and '.join(sorted(short))}, runs of short responses, "
                         "but --short_iters=0 skips them: give --short_iters > 0, or leave them out of --settings")
    for path in cfg.plot.split(",") if cfg.plot else []:
        if not os.path.exists(path):
            raise ValueError(f"{path!r} does not exist (--plot takes metrics files or run directories)")


SETTINGS_RUN = ("main", "grid", "short", "kl", "rm", "paper")


def plan(cfg):
    """The runs: {(setting, algo, lr, seed): iterations}, the longest that any table or plot of the settings chosen
    needs. The kl setting's table takes GRPO's, Dr. GRPO's and RLOO's own places for the KL from the short setting."""
    seeds, chosen = range(1 if cfg.quick else cfg.seeds), cfg.settings.split(",")
    main_iters, grid_iters, short_iters = (4, 3, 3) if cfg.quick else (cfg.iters, cfg.grid_iters, cfg.short_iters)
    lrs = [cfg.lr, 3 * cfg.lr] if cfg.quick else [float(x) for x in cfg.lrs.split(",")]
    runs = {}
    for seed in seeds if "main" in chosen else []:     # main first: the table is done before the map
        for algo in algos("main"):
            runs["main", algo, cfg.lr, seed] = main_iters
    def grid(lrs):
        for lr in lrs if "grid" in chosen else []:
            for seed in seeds:
                for algo in algos("grid"):
                    key = ("main", algo, lr, seed)
                    runs[key] = max(runs.get(key, 0), grid_iters)
    grid(sorted(lr for lr in lrs if lr >= cfg.lr))     # the unstable end of the map first,
    for seed in seeds if short_iters else []:          # then the short responses (cheap),
        for algo in algos("short") if "short" in chosen else KL_DEFAULT if "kl" in chosen else []:
            runs["short", algo, cfg.lr, seed] = short_iters
        for algo in algos("kl") if "kl" in chosen else []:
            runs["kl", algo, cfg.lr, seed] = short_iters
    grid(sorted(lr for lr in lrs if lr < cfg.lr))      # then the slow end
    return runs, main_iters, grid_iters, short_iters, lrs


def run_dir(cfg, setting, algo, lr, seed):
    return os.path.join(cfg.out_dir, setting, f"{algo}_lr{lr:g}_seed{seed}")


def read_rows(path):
    """The rows of a metrics.jsonl (path: the file or its run directory); [] if there is none. A last line
    without its newline is a run stopped mid-write (train.py's --resume drops it): skipped, with a note;
    any other line that is not a row of metrics is an error."""
    path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:            # a binary file: an error at its first line
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if i == len(lines) and not line.endswith("\n"):
                print(f"note: {path}: its last line is half-written (a run stopped mid-write): skipped")
                break
            raise ValueError(f"{path} line {i} is not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {i} is not a row of metrics (a JSON object): {line.strip()[:40]!r}")
        rows.append(row)
    return rows


def is_done(path, iters):
    """A run stopped mid-write has one row fewer than it wrote: not done, it resumes."""
    return len(read_rows(path)) >= iters or os.path.exists(os.path.join(path, "failed.txt"))


# ---------------------------------------------------------------------------------------------
# running: each run is train.train in a worker process, its printout in the run's log.txt


NOT_JSTAR = {"evaluator", "algo", "apa_form", "gamma", "gae_lambda", "cliprange", "cliprange_value", "vf_coef",
             "awr_lam", "awr_max_weight", "seed", "iters", "batch_size", "minibatch_size", "epochs", "lr", "max_grad_norm",
             "max_bad_steps", "out_dir", "resume", "sample_every", "ckpt_every", "exact_every", "target_kl",
             "eval_prompts", "eval_every", "eval_samples", "apa_clip", "group_size", "grpo_std", "kl", "threads"}  # J* ignores
KNOWN = {}                                              # this worker's J* and exact responses, by jstar_key
SPACES = {}                                             # and the exact responses alone, which lambda does not change


def jstar_key(cfg):
    """J* and the exact evaluator's responses depend on pi_init, the data, lambda and the response length, not on the
    RL settings (NOT_JSTAR): runs that agree on the rest share them (train.train's known)."""
    return tuple((k, v) for k, v in dataclasses.asdict(cfg).items() if k not in NOT_JSTAR)


def init_worker(pool=False):
    import torch
    from transformers.utils import logging as hf_logging
    if pool:                                            # Ctrl-C: the main process ends the pool, no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # from each worker
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()


def run_one(job):
    """One (setting, algo, lr, seed) run to `iters` iterations, resumed from its checkpoint if any. Its printout goes
    to its log.txt; the console gets a line when it starts and one when it ends."""
    import train
    overrides, path, iters, tag = job
    cfg = dataclasses.replace(train.Config(), **overrides, iters=iters, out_dir=path, sample_every=0,
                              resume=os.path.exists(os.path.join(path, "ckpt.pt")))
    os.makedirs(path, exist_ok=True)
    t0, history, key = time.time(), [], jstar_key(cfg)
    print(f"{tag}: started", flush=True)
    with open(os.path.join(path, "log.txt"), "a") as log, contextlib.redirect_stdout(log):
        try:
            known = KNOWN.setdefault(key, {})                            # J*, exact responses: once a worker and key
            space_key = tuple((k, v) for k, v in key if k != "lam")
            if space_key in SPACES:
                known.setdefault("space", SPACES[space_key])
            history = train.train(cfg, known)
            if known.get("space"):
                SPACES[space_key] = known["space"]
        except FloatingPointError as e:                  # a diverged run is a result, not a crash
            with open(os.path.join(path, "failed.txt"), "w") as f:
                f.write(str(e) + "\n")
            print(f"{tag}: stopped: {e}", file=sys.__stdout__, flush=True)
    last = f" | reward {history[-1]['reward']:.3f}, kl {history[-1]['kl']:.3f} at the end" if history else ""
    print(f"{tag}: done in {time.time() - t0:.0f}s{last}", flush=True)


def run_all(cfg, runs):
    todo = [(k, n) for k, n in runs.items() if not is_done(run_dir(cfg, *k), n)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run, {cfg.workers} at a time")
    jobs = []
    for k, ((setting, algo, lr, seed), iters) in enumerate(todo):
        overrides = dict(dict(lr=lr, seed=seed, sft_dir=cfg.sft_dir, target_kl=0.0,  # the algorithms as their
                              **(QUICK if cfg.quick else {})), **ALGOS[algo])    # papers have them: no KL guard
        if setting in ("short", "kl"):
            overrides["max_new_tokens"] = cfg.short_tokens
        tag = f"[{k + 1}/{len(todo)}] {setting} {algo} lr {lr:g} seed {seed}"
        jobs.append((overrides, run_dir(cfg, setting, algo, lr, seed), iters, tag))
    run_jobs(cfg, jobs)


def run_jobs(cfg, jobs):
    """Each job (train.Config overrides, folder, iterations, tag) as a run, cfg.workers at a time."""
    if not jobs:
        return
    import data
    import torch
    import train
    from lab import runs
    runs.cached_pretrain(dataclasses.replace(train.Config(), **jobs[0][0]), data.get_encoding("task"),
                         torch.device("cpu"))            # pi_init, once (cached), before the workers start
    if cfg.workers > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers, initializer=init_worker, initargs=(True,)) as pool:
            for _ in pool.imap_unordered(run_one, jobs):
                pass
    else:
        init_worker()
        for job in jobs:
            run_one(job)


# ---------------------------------------------------------------------------------------------
# tables


def gap_key(rows):
    return "gap_exact" if any("gap_exact" in r for r in rows) else "gap"


def gap_curve(rows, n=10):
    """(samples, gap): the exact gap where train.py logged it (every exact_every iterations; no sampling
    noise, so not smoothed), else the sampled gap's n-iteration moving mean."""
    key = gap_key(rows)
    points = [(r["samples"], r[key]) for r in rows if key in r]
    x, y = np.array(points, dtype=float).T
    if key == "gap_exact":
        return x, y
    y = moving_mean(y, n)
    return x[len(x) - len(y):], y


def moving_mean(x, n=10):
    x, n = np.asarray(x, dtype=float), min(n, len(x))
    return np.convolve(x, np.ones(n) / n, "valid")


def summary(rows, last=20):
    """Final values (means over the last `last` iterations), the largest 10-iteration mean of KL, and
    the samples until the gap (exact, or the sampled one's 10-iteration mean) first falls to a quarter of its start."""
    tail, g = rows[-last:], gap_key(rows)
    out = {k: float(np.mean([r[k] for r in tail])) for k in ("reward", "kl", "distinct2", "entropy")}
    out["gap"] = float(np.mean([r[g] for r in tail if g in r]))
    out["kl_max"] = float(moving_mean([r["kl"] for r in rows]).max())
    samples, gaps = gap_curve(rows)
    reached = np.nonzero(gaps <= gaps[0] / 4)[0]
    out["samples_to_quarter_gap"] = samples[reached[0]] if len(reached) else math.nan
    return out


def stat(values, fmt):
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "not reached"
    mean, n = np.nanmean(v), int(np.sum(~np.isnan(v)))
    miss = f" ({int(np.isnan(v).sum())} not reached)" if np.isnan(v).any() else ""
    return (f"{mean:{fmt}} +- {np.nanstd(v, ddof=1):{fmt}}" if n > 1 else f"{mean:{fmt}}") + miss


def finished(cfg, setting, algo, lr, seeds, iters):
    """[(rows[:iters], stopped)] of the runs that are done: all iterations, or stopped (diverged)."""
    out = []
    for seed in seeds:
        path = run_dir(cfg, setting, algo, lr, seed)
        rows, stopped = read_rows(path)[:iters], os.path.exists(os.path.join(path, "failed.txt"))
        if rows and (len(rows) == iters or stopped):
            out.append((rows, stopped))
    return out


def count_note(done, n):
    stopped = sum(st for _, st in done)
    return "".join([f" ({len(done)} of {n} seeds)" if len(done) < n else "", f" ({stopped} stopped)" if stopped else ""])


def table(cfg, setting, lr, iters, seeds):
    cols = [("reward", ".3f"), ("kl", ".2f"), ("gap", ".3f"), ("distinct2", ".3f"), ("kl_max", ".2f"),
            ("samples_to_quarter_gap", ".0f")]
    lines = ["| algorithm | reward | KL | gap J* - J | distinct-2 | largest KL (10-iteration mean) "
             "| samples to a quarter of the first gap |", "|---" * (len(cols) + 1) + "|"]
    for algo in algos(setting):
        done = finished(cfg, setting, algo, lr, seeds, iters)
        s = [summary(rows) for rows, _ in done]
        cells = [stat([x[c] for x in s], f) if s else "not run" for c, f in cols]
        lines.append(f"| {name(algo)}{count_note(done, len(seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fixed_point_table(cfg, lr, iters, seeds):
    """Which algorithms reach pi*: the fixed point in theory beside the measured (exact, where logged) final gap."""
    lines = ["| algorithm | fixed point, in theory (the test) | gap J* - J after training |", "|---|---|---|"]
    for algo in algos("short"):
        s = [summary(rows) for rows, _ in finished(cfg, "short", algo, lr, seeds, iters)]
        lines.append(f"| {name(algo)} | {FIXED_POINT[algo]} | "
                     f"{stat([x['gap'] for x in s], '.3f') if s else 'not run'} |")
    return "\n".join(lines)


def kl_table(cfg, lr, iters, seeds):
    """Where GRPO's, Dr. GRPO's and RLOO's KL goes: the fixed point of each place in theory, and the final exact gap
    and KL to pi_init of the runs with 2-token responses (their own place: the short setting's runs)."""
    lines = ["| algorithm | KL | fixed point, in theory (the test) | gap J* - J after training | KL to pi_init |",
             "|---|---|---|---|---|"]
    for base in KL_DEFAULT:
        for kl in KL_PLACES:
            setting, algo = ("short", base) if kl == KL_DEFAULT[base] else ("kl", f"{base}_{kl}")
            s = [summary(rows) for rows, _ in finished(cfg, setting, algo, lr, seeds, iters)]
            cells = [stat([x[c] for x in s], f) if s else "not run" for c, f in (("gap", ".3f"), ("kl", ".2f"))]
            lines.append(f"| {name(base)} | {KL_PLACES[kl]}{' (its own)' if kl == KL_DEFAULT[base] else ''} | "
                         f"{KL_FIXED_POINT[base, kl]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(cfg, lrs, iters, seeds):
    lines = ["| algorithm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for algo in algos("grid"):
        cells = []
        for lr in lrs:
            done = finished(cfg, "main", algo, lr, seeds, iters)
            s = [summary(rows) for rows, _ in done]
            if not s:
                cells.append("not run")
                continue
            note = f"KL max {max(x['kl_max'] for x in s):.1f}"
            if "target_kl" in ALGOS[algo]:                             # the updates the KL guard cut short
                stops = sum("kl_stop" in r for rows, _ in done for r in rows)
                note += f"; guard fired in {stops} of {sum(len(rows) for rows, _ in done)} updates"
            cells.append(f"{stat([x['gap'] for x in s], '.3f')} ({note}){count_note(done, len(seeds))}")
        lines.append(f"| {name(algo)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


SETTINGS = {"algorithm": "", "lr": "lr ", "iters": "iterations ", "max_new_tokens": "response tokens ",
            "lam": "lambda ", "seed": "seed "}              # what a plot names, and how


def load_run(path):
    """(settings, rows) of a run directory or metrics.jsonl; settings from config.json beside it."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    rows = read_rows(path)
    conf_path, conf = os.path.join(folder, "config.json"), {}
    if os.path.exists(conf_path):
        try:
            with open(conf_path) as f:
                conf = json.load(f)
            if not isinstance(conf, dict):
                raise ValueError(f"a JSON {type(conf).__name__}, not an object")
        except ValueError as e:                         # the plot's labels would be wrong: refuse
            raise ValueError(f"{conf_path} is damaged ({e}): remove it to plot without the run's settings") from None
    settings = {k: conf.get(k, "?") for k in SETTINGS}
    settings["algorithm"] = algo_name(conf)
    settings["iters"] = len(rows)                       # the iterations it ran
    return settings, rows


def algo_name(conf):
    """The name of a run's algorithm: the most specific entry of ALGOS that its config.json matches, with the run's
    own group size."""
    import train
    defaults = dataclasses.asdict(train.resolve(train.Config(**{k: v for k, v in conf.items() if k == "algo"})))
    conf = {k: v if v is not None else defaults[k] for k, v in conf.items() if k in defaults}
    match = [a for a in ALGOS if all(conf.get(k, defaults[k]) == v for k, v in ALGOS[a].items())]
    return name(max(match, key=lambda a: len(ALGOS[a])), conf.get("group_size", defaults["group_size"])) if match else "?"


def plot_curves(runs, path, what=""):
    """Reward, KL and gap against samples. runs: [(settings, rows)]. Runs that differ only in their
    seed are one line, their mean, with a band from min to max; the title names what all share and
    the legend what differs (algorithm, lr, iterations, ...). train.py's held-out evaluation (eval_reward, eval_kl),
    where logged, is dashed. Returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    differ = [k for k in SETTINGS if k != "seed" and len({str(s[k]) for s, _ in runs}) > 1]
    same = [k for k in SETTINGS if k not in differ and (k != "seed" or len({s["seed"] for s, _ in runs}) == 1)]
    groups = {}
    for settings, rows in runs:
        groups.setdefault(tuple(settings[k] for k in differ), []).append(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [("reward", "reward (score in [-1, 1])"), ("kl", "KL(pi || pi_init) (nats)"),
              (None, "gap J* - J (reward units)")]
    finals = {key: [] for key, _ in labels}            # each line's last value, to choose the y scale
    for i, (label, group) in enumerate(groups.items()):
        n = min(len(rows) for rows in group)
        x = np.array([r["samples"] for r in group[0][:n]])
        for ax, (key, ylabel) in zip(axes, labels):
            if key is None:
                xs, curves = gap_curve(group[0][:n])[0], np.array([gap_curve(rows[:n])[1] for rows in group])
            else:
                curves = np.array([moving_mean([r[key] for r in rows[:n]]) for rows in group])
                xs = x[len(x) - curves.shape[1]:]
            color = f"C{i}"
            name = ", ".join(f"{SETTINGS[k]}{v}" for k, v in zip(differ, label)) or "run"
            finals[key].append(abs(curves.mean(0)[-1]))
            ax.plot(xs, curves.mean(0), color=color, label=name + (f" ({len(group)} seeds)" if len(group) > 1 else ""))
            if len(group) > 1:
                ax.fill_between(xs, curves.min(0), curves.max(0), color=color, alpha=0.2)
            held_out = [(r["samples"], r[f"eval_{key}"]) for r in group[0][:n] if f"eval_{key}" in r]
            if held_out:                                # train.py's held-out evaluation (first seed): dashed
                ax.plot(*zip(*held_out), color=color, ls="--", marker=".", label=f"{name}, held-out prompts")
            ax.set(xlabel="samples (responses)", ylabel=ylabel)
            ax.grid(alpha=0.3)
    for ax, key, linthresh in ((axes[1], "kl", 1.0), (axes[2], None, 0.01)):
        if max(finals[key]) > 10 * max(min(finals[key]), linthresh):  # lines far apart: log scale
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.set_ylabel(ax.get_ylabel() + ", log scale above " + f"{linthresh:g}")
    axes[2].axhline(0, color="black", lw=0.8)
    axes[0].legend(fontsize=8)
    shared = ", ".join(f"{SETTINGS[k]}{runs[0][0][k]}" for k in same if runs[0][0][k] != "?")
    exact = any(gap_key(rows) == "gap_exact" for _, rows in runs)
    fig.suptitle(f"{what}{shared}: 10-iteration moving means" + (" (the gap: exact, not smoothed)" if exact else "")
                 + ("; band: min to max over seeds" if any(len(g) > 1 for g in groups.values()) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def plot_stability(cfg, lrs, iters, seeds, path):
    """Final gap against learning rate, one line per algorithm, seed spread as min-max bars."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, algo in enumerate(algos("grid")):
        points = [(lr, [summary(rows)["gap"] for rows, _ in finished(cfg, "main", algo, lr, seeds, iters)])
                  for lr in sorted(lrs)]
        if not any(g for _, g in points):
            continue
        x = np.array([lr for lr, g in points if g]) * (1.03 ** (i - 3.5))  # side by side: bars do not overlap
        gaps = [np.array(g) for _, g in points if g]   # final gaps of the seeds at each lr
        mean = np.array([g.mean() for g in gaps])
        ax.errorbar(x, mean, yerr=[mean - [g.min() for g in gaps], [g.max() for g in gaps] - mean], marker="o",
                    capsize=3, color=f"C{i}", label=name(algo))
    ax.set(xscale="log", yscale="log", xlabel="learning rate (Adam)",
           ylabel="final gap J* - J (mean of last 20 iterations)",
           title=f"Stability map: {iters} iterations, " + (f"{len(seeds)} seeds (bars: min to max)" if len(seeds) > 1
                                                            else f"seed {seeds[0]}"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the experiment


# ---------------------------------------------------------------------------------------------
# the rm setting: reward over-optimisation, measured exactly
#
# Reward over-optimisation, measured exactly: RL against a reward model learned from preferences (reward_model.py), and
# judged by the embedded task's own reward, which the runs never train on. With 2-token responses the exact evaluator
# lists every response, so each run's judge score, its KL to pi_init and the frontier (the best judge score that any
# policy reaches at the same KL) are exact numbers, and over-optimisation is one of them: the judge score lost against
# the frontier. The figure is Gao, Schulman and Hilton's (2022, arXiv 2210.10760): the judge ("gold") score against the
# KL, for each algorithm, with the frontier drawn.
#
# Paper: Zhu et al. 2023, arXiv 2306.02231, Sec. 5: "APA consistently outperforms PPO by a large margin when a separate
# reward model is employed as the evaluator", and keeps a steadier control of the KL to pi_init.
# Run:  python -m experiments.compare --settings=rm     the reward model, then the sweep (docs/experiments.md)
#       python -m experiments.compare --settings=rm --quick=1   a smoke test on a tiny model
#
# What it runs. Every run is train.train with a Config; nothing of training is written here.
# 1. The reward model: reward_model.py's default (2,000 pairs of pi_init's responses labelled by the simulated
#    annotator at beta 1, 500 held out), trained once into out_dir/rm/reward_model.
# 2. The algorithms of RM_ALGOS at each lambda of --rm_lams, seeds 0 .. seeds-1, 2-token responses, against the reward
#    model (the proxy), with the task's reward as the judge (--gold_fn): out_dir/rm/<algo>_lam<lambda>_seed<seed>/.
# 3. The table: the final exact proxy score, judge score, KL, distinct-2 and the judge score lost against the frontier;
#    the plot: rm.png.
# Where this departs from the paper: a 0.44M-parameter GPT, 2-token responses on 8 prompts (every fifth opening of the
# task, so that the exact evaluator's 730,000 responses are scored by the reward model in about a minute), a simulated
# annotator, and the task's reward as the judge in place of people.


RM_ALGOS = ["apa", "apa_paper", "ppo", "awr", "grpo", "rloo"]
QUICK_RM = ["--pairs=200", "--epochs=1"]                 # reward_model.py's overrides under --quick


def rm_folder(cfg):
    return os.path.join(cfg.out_dir, "rm")


def rm_run_dir(cfg, algo, lam, seed):
    return os.path.join(rm_folder(cfg), f"{algo}_lam{lam:g}_seed{seed}")


def rm_lams(cfg):
    return [float(x) for x in cfg.rm_lams.split(",")]


def rm_validate(cfg):
    """Refuse, before any work, the rm setting's flags that mean nothing (its runs bypass validate's rules on lr and
    iterations: train.py's checks come only after the reward model is trained), and --run=0 with nothing to tabulate."""
    for item in cfg.rm_lams.split(","):
        try:
            ok = 0 < float(item) < math.inf
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"rm_lams must be comma-separated KL coefficients > 0, got {item!r} in {cfg.rm_lams!r}")
    if cfg.rm_iters <= 0:
        raise ValueError(f"rm_iters must be > 0, got {cfg.rm_iters}")
    if not cfg.run and not os.path.exists(os.path.join(rm_folder(cfg), "reward_model", "metrics.json")):
        raise ValueError(f"--run=0 tabulates the runs done, but {rm_folder(cfg)} holds no reward model and no run: "
                         "run without --run=0 first")


def rm_prepare(cfg):
    """The prompts files (every fifth training and held-out opening) and the reward model, trained once. Returns the
    train.Config overrides that every run shares."""
    import data
    import reward_model
    os.makedirs(rm_folder(cfg), exist_ok=True)
    files = {}
    n = 2 if cfg.quick else 8                           # --quick: 2 prompts, whose responses score in seconds
    for key, prompts in (("prompts", data.task_prompts()[::5][:n]), ("eval_prompts", data.task_eval_prompts()[::5][:n])):
        files[key] = os.path.join(rm_folder(cfg), f"{key}.txt")
        with open(files[key], "w") as f:
            f.write("\n".join(prompts) + "\n")
    model = {k: v for k, v in QUICK.items() if k in ("n_layer", "n_head", "n_embd", "block_size", "sft_steps",
                                                      "sft_lr")} if cfg.quick else {}
    rm_dir = os.path.join(rm_folder(cfg), "reward_model")
    if not os.path.exists(os.path.join(rm_dir, "metrics.json")):
        reward_model.main([f"--out_dir={rm_dir}", f"--sft_dir={cfg.sft_dir}", "--device=cpu"]
                          + [f"--{k}={v}" for k, v in model.items()] + (QUICK_RM if cfg.quick else []))
    return dict(model, **files, reward_model=rm_dir, gold_fn="data:sentiment_reward", max_new_tokens=2,
                jstar_samples=0, exact_every=1 if cfg.quick else 10, eval_every=50, eval_samples=64, sft_dir=cfg.sft_dir,
                target_kl=0.0, device="cpu", **({"batch_size": 16, "minibatch_size": 8} if cfg.quick else {}))


def rm_plan(cfg):
    """The runs: {(algo, lambda, seed): iterations}."""
    iters = 3 if cfg.quick else cfg.rm_iters
    return {(algo, lam, seed): iters for lam in rm_lams(cfg) for seed in range(1 if cfg.quick else cfg.seeds)
            for algo in RM_ALGOS}


def rm_run_all(cfg, shared, runs):
    todo = [(k, n) for k, n in runs.items() if not is_done(rm_run_dir(cfg, *k), n)]
    print(f"{len(runs)} runs against the reward model, {len(runs) - len(todo)} already done, {len(todo)} to run, "
          f"{cfg.workers} at a time")
    jobs = [(dict(shared, **ALGOS[algo], lam=lam, seed=seed, lr=cfg.lr), rm_run_dir(cfg, algo, lam, seed), iters,
             f"[{i + 1}/{len(todo)}] rm {algo} lambda {lam:g} seed {seed}")
            for i, ((algo, lam, seed), iters) in enumerate(todo)]
    run_jobs(cfg, jobs)


def rm_final(rows):
    """A run's last exact evaluation, with distinct-2 averaged over its last 20 iterations."""
    exact = [r for r in rows if "gold_exact" in r]
    return dict(exact[-1], distinct2=float(np.mean([r["distinct2"] for r in rows[-20:]]))) if exact else None


def rm_table(cfg, iters):
    """Per algorithm and lambda: the final exact proxy score, judge score, KL, distinct-2 and judge score lost
    against the frontier, mean +- std over seeds."""
    seeds = range(1 if cfg.quick else cfg.seeds)
    head = ["| algorithm | lambda | proxy (reward model) | judge (true reward) | KL | distinct-2 | judge lost to the "
            "frontier |", "|---|---|---|---|---|---|---|"]
    lines = []
    for algo in RM_ALGOS:
        for lam in rm_lams(cfg):
            ends = [rm_final(read_rows(rm_run_dir(cfg, algo, lam, s))[:iters]) for s in seeds]
            ends = [e for e in ends if e]
            if not ends:
                continue
            cell = lambda key, fmt: stat([e[key] for e in ends], fmt)  # noqa: E731
            lines.append(f"| {name(algo)} | {lam:g} | {cell('reward_exact', '.3f')} | {cell('gold_exact', '.3f')} "
                         f"| {cell('kl_exact', '.2f')} | {cell('distinct2', '.3f')} | {cell('gold_lost_exact', '.3f')} |")
    return "\n".join(head + lines)


def rm_plot(cfg, iters, path):
    """The judge score against the KL to pi_init, every exact evaluation of every run (the final ones larger), one
    colour per algorithm, and the frontier through the (KL, frontier) points the runs logged. Returns the path, or None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    frontier = []
    for i, algo in enumerate(RM_ALGOS):
        for lam in rm_lams(cfg):
            for seed in range(1 if cfg.quick else cfg.seeds):
                rows = [r for r in read_rows(rm_run_dir(cfg, algo, lam, seed))[:iters] if "gold_exact" in r]
                if not rows:
                    continue
                frontier += [(r["kl_exact"], r["gold_frontier_exact"]) for r in rows]
                label = name(algo) if (lam, seed) == (rm_lams(cfg)[0], 0) else None
                for ax, key in zip(axes, ("gold_exact", "reward_exact")):
                    ax.plot([r["kl_exact"] for r in rows], [r[key] for r in rows], color=f"C{i}", lw=0.6, alpha=0.5)
                    ax.scatter([rows[-1]["kl_exact"]], [rows[-1][key]], color=f"C{i}", s=18, label=label)
    frontier.sort()
    axes[0].plot(*zip(*frontier), color="black", lw=1.5, label="frontier: the best judge score at each KL")
    axes[0].set(xlabel="KL(pi || pi_init) (nats), exact", ylabel="judge: the task's reward, exact",
                title="what a person would judge")
    axes[1].set(xlabel="KL(pi || pi_init) (nats), exact", ylabel="proxy: the reward model's score, exact",
                title="what the runs optimise")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"RL against a learned reward model, lambda in {{{cfg.rm_lams}}}, {iters} iterations: each run's path "
                 "(line) and its end (dot)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def rm_sweep(cfg):
    """The reward model, the runs, the table and the plot. Returns the markdown section."""
    shared = rm_prepare(cfg)
    runs = rm_plan(cfg)
    iters = next(iter(runs.values()))
    if cfg.run:
        rm_run_all(cfg, shared, runs)
    with open(os.path.join(shared["reward_model"], "metrics.json")) as f:
        rm = json.load(f)
    text = "\n".join([
        f"## Over-optimisation: RL against a learned reward model, judged by the task's reward, {iters} iterations", "",
        f"The reward model: {rm['pairs']} held-out pairs, accuracy {rm['accuracy']:.3f} against the annotator's labels"
        + (f" and {rm['accuracy_true']:.3f} against the true reward's order, Spearman {rm['spearman']:.3f}"
           if "accuracy_true" in rm else "") + ". Every number below is exact (every 2-token response listed), at the "
        "last iteration; +- is the standard deviation over seeds. The frontier is the best judge score that any policy "
        "reaches at the same KL to pi_init.", "", rm_table(cfg, iters), ""])
    path = rm_plot(cfg, iters, os.path.join(cfg.out_dir, "rm.png"))
    return text, path


# ---------------------------------------------------------------------------------------------
# the paper setting: the paper's claim where it could show
#
# The regime of the paper's runs (Zhu et al. 2023, Sec. 5): responses of 20 tokens (the task's default), trained against
# a learned reward model (the proxy) for a fixed budget of iterations, stopped short of convergence, at learning rates
# from stable to unstable; APA in this project's exact form, in the paper's literal form and in the authors'
# configuration (--apa_form=authors: the paper form with its advantages whitened), and PPO. Each run is judged on the
# held-out prompts, by sampling, twice: by the paper's evaluator, a second reward model fitted to other pairs, and by
# the truth, the task's own reward (gold). The figure is Gao, Schulman and Hilton's (2022, arXiv 2210.10760): the
# evaluator's and gold's score against the KL to pi_init, over training.
#
# Run:  python -m experiments.compare --settings=paper           the two reward models, then the sweep
#       python -m experiments.compare --settings=paper --quick=1 a smoke test on a tiny model
#
# What it runs. Every run is train.train with a Config; nothing of training is written here.
# 1. The proxy: reward_model.py's default (2,500 pairs of pi_init's responses, labelled by the simulated annotator,
#    seed 0). The evaluator: reward_model.py with EVALUATOR_ARGS (another seed: other responses and other labels, and
#    twice the pairs). Each is trained once, into out_dir/paper/proxy and out_dir/paper/evaluator.
# 2. The algorithms of PAPER_ALGOS at each learning rate of --paper_lrs, seeds 0 .. seeds-1, for --paper_iters
#    iterations, against the proxy, with the evaluator and the judge evaluated every --paper_eval_every iterations on
#    --paper_eval_samples responses to the held-out prompts: out_dir/paper/<algo>_lr<lr>_seed<seed>/.
# 3. The table (paper.md): per algorithm and learning rate, the best held-out gold score along the way and the last,
#    the last of the evaluator and of the proxy, the last KL, the largest 10-iteration mean KL of training, the runs
#    that diverged and distinct-2, each a mean +- its standard error over seeds; the order in which the evaluator, gold
#    and the proxy rank the algorithms at each learning rate; the figure paper.png.


PAPER_ALGOS = ["apa", "apa_paper", "apa_authors", "ppo"]
EVALUATOR_ARGS = ["--seed=1", "--pairs=5000"]           # reward_model.py's overrides for the evaluator
QUICK_EVALUATOR = ["--seed=1", "--pairs=400", "--epochs=1"]  # and under --quick (the proxy's: QUICK_RM)
QUICK_PAPER = dict(paper_iters=4, paper_eval_every=2, paper_eval_samples=16)  # --quick's budget
DIVERGED_KL = 10.0                                      # a run diverged: stopped by non-finite steps, or its KL to
                                                        # pi_init (10-iteration mean) above this many nats


def paper_folder(cfg):
    return os.path.join(cfg.out_dir, "paper")


def paper_run_dir(cfg, algo, lr, seed):
    return os.path.join(paper_folder(cfg), f"{algo}_lr{lr:g}_seed{seed}")


def paper_budget(cfg):
    """(learning rates, seeds, iterations, evaluate every, samples of each evaluation): --quick's, or the config's."""
    if cfg.quick:
        return [cfg.lr, 3 * cfg.lr], range(1), *QUICK_PAPER.values()
    return ([float(x) for x in cfg.paper_lrs.split(",")], range(cfg.seeds), cfg.paper_iters, cfg.paper_eval_every,
            cfg.paper_eval_samples)


def paper_prepare(cfg):
    """The proxy and the evaluator, each trained once. Returns the train.Config overrides that every run shares."""
    import reward_model
    model = {k: v for k, v in QUICK.items() if k in ("n_layer", "n_head", "n_embd", "block_size", "sft_steps",
                                                      "sft_lr")} if cfg.quick else {}
    folders = {}
    pairs = (QUICK_RM, QUICK_EVALUATOR) if cfg.quick else ([], EVALUATOR_ARGS)
    for key, args in zip(("reward_model", "evaluator"), pairs):
        folders[key] = os.path.join(paper_folder(cfg), "proxy" if key == "reward_model" else "evaluator")
        if not os.path.exists(os.path.join(folders[key], "metrics.json")):
            reward_model.main([f"--out_dir={folders[key]}", f"--sft_dir={cfg.sft_dir}", "--device=cpu"]
                              + [f"--{k}={v}" for k, v in model.items()] + args)
    _, _, _, eval_every, eval_samples = paper_budget(cfg)
    return dict(model, **folders, gold_fn="data:sentiment_reward", jstar_samples=0, exact_every=0,
                eval_every=eval_every, eval_samples=eval_samples, sft_dir=cfg.sft_dir, target_kl=0.0, device="cpu",
                **({k: v for k, v in QUICK.items() if k in ("batch_size", "minibatch_size", "epochs",
                                                            "max_new_tokens")} if cfg.quick else {}))


def paper_run_all(cfg, shared):
    lrs, seeds, iters, _, _ = paper_budget(cfg)
    runs = [(algo, lr, seed) for lr in lrs for seed in seeds for algo in PAPER_ALGOS]
    todo = [k for k in runs if not is_done(paper_run_dir(cfg, *k), iters)]
    print(f"{len(runs)} runs in the paper's regime, {len(runs) - len(todo)} already done, {len(todo)} to run, "
          f"{cfg.workers} at a time")
    run_jobs(cfg, [(dict(shared, **ALGOS[algo], lr=lr, seed=seed), paper_run_dir(cfg, algo, lr, seed), iters,
                    f"[{i + 1}/{len(todo)}] paper {algo} lr {lr:g} seed {seed}")
                   for i, (algo, lr, seed) in enumerate(todo)])


def paper_summary(rows, stopped=False):
    """One run's numbers: the best held-out gold score along the way (best_gold); the last held-out evaluation's gold,
    evaluator, proxy and KL (gold, evaluator, reward, kl); the largest 10-iteration mean of the training KL (kl_max);
    whether it diverged (stopped, or kl_max above DIVERGED_KL); distinct-2, the mean over the last 20 iterations."""
    held_out = [r for r in rows if "eval_gold" in r]
    kl_max = float(moving_mean([r["kl"] for r in rows]).max())
    return {"best_gold": max(r["eval_gold"] for r in held_out), "gold": held_out[-1]["eval_gold"],
            "evaluator": held_out[-1]["eval_evaluator"], "reward": held_out[-1]["eval_reward"],
            "kl": held_out[-1]["eval_kl"], "kl_max": kl_max,
            "diverged": float(stopped or not kl_max <= DIVERGED_KL),
            "distinct2": float(np.mean([r["distinct2"] for r in rows[-20:]]))}


def mean_se(values, fmt):
    """mean +- its standard error (std / sqrt(n), over seeds); the mean alone for one value."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():{fmt}} +- {v.std(ddof=1) / math.sqrt(len(v)):{fmt}}" if len(v) > 1 else f"{v.mean():{fmt}}"


def paper_results(cfg):
    """{(algo, lr): [summaries of its finished runs]} and the iterations of each run."""
    lrs, seeds, iters, _, _ = paper_budget(cfg)
    return {(algo, lr): [paper_summary(rows, stopped) for rows, stopped in finished_runs(
        [paper_run_dir(cfg, algo, lr, s) for s in seeds], iters)] for algo in PAPER_ALGOS for lr in lrs}, iters


def finished_runs(paths, iters):
    """[(rows[:iters], stopped)] of the runs in paths that are done (all iterations, or stopped) and evaluated."""
    out = []
    for path in paths:
        rows, stopped = read_rows(path)[:iters], os.path.exists(os.path.join(path, "failed.txt"))
        if rows and (len(rows) == iters or stopped) and any("eval_gold" in r for r in rows):
            out.append((rows, stopped))
    return out


PAPER_COLS = [("best_gold", ".3f"), ("gold", ".3f"), ("evaluator", ".3f"), ("reward", ".3f"), ("kl", ".2f"),
              ("kl_max", ".2f"), ("distinct2", ".3f")]


def paper_table(cfg):
    results, _ = paper_results(cfg)
    lines = ["| algorithm | lr | best gold along the way | gold, last | evaluator, last | proxy, last | KL, last | "
             "largest KL (10-iteration mean) | distinct-2 | diverged |", "|---" * 10 + "|"]
    for (algo, lr), s in results.items():
        if not s:
            continue
        cells = [mean_se([x[c] for x in s], f) for c, f in PAPER_COLS]
        lines.append(f"| {name(algo)} | {lr:g} | " + " | ".join(cells)
                     + f" | {int(sum(x['diverged'] for x in s))} of {len(s)} |")
    return "\n".join(lines)


def paper_rankings(cfg):
    """At each learning rate, the algorithms in the order of their mean last score by the evaluator, by gold and by
    the proxy, and whether the evaluator's order is gold's."""
    results, _ = paper_results(cfg)
    lrs = sorted({lr for _, lr in results})
    lines = ["| lr | by the evaluator | by gold (the truth) | by the proxy | the evaluator ranks as gold does |",
             "|---|---|---|---|---|"]
    for lr in lrs:
        done = {algo: s for (algo, l), s in results.items() if l == lr and s}
        if not done:
            continue
        order = {key: sorted(done, key=lambda a: -np.mean([x[key] for x in done[a]]))
                 for key in ("evaluator", "gold", "reward")}
        cells = [" > ".join(name(a) for a in order[key]) for key in ("evaluator", "gold", "reward")]
        agree = "yes" if order["evaluator"] == order["gold"] else "no"
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {agree} |")
    return "\n".join(lines)


def paper_plot(cfg, path):
    """Gold's (top row) and the evaluator's (bottom row) held-out score against the held-out KL to pi_init, over
    training, one column per learning rate, one curve per algorithm (the mean over seeds at each evaluation; a dot at
    the last). Returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    lrs, seeds, iters, _, _ = paper_budget(cfg)
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.5 * len(lrs), 8), squeeze=False)
    for j, lr in enumerate(lrs):
        for i, algo in enumerate(PAPER_ALGOS):
            runs = [[r for r in rows if "eval_gold" in r] for rows, _ in
                    finished_runs([paper_run_dir(cfg, algo, lr, s) for s in seeds], iters)]
            n = min((len(r) for r in runs), default=0)
            if not n:
                continue
            kl = np.mean([[r["eval_kl"] for r in rows[:n]] for rows in runs], 0)
            for ax, key in zip(axes[:, j], ("eval_gold", "eval_evaluator")):
                score = np.mean([[r[key] for r in rows[:n]] for rows in runs], 0)
                ax.plot(kl, score, color=f"C{i}", marker=".", lw=1, label=name(algo))
                ax.scatter(kl[-1:], score[-1:], color=f"C{i}", s=40)
        axes[0, j].set(title=f"lr {lr:g}", ylabel="gold: the task's reward (held out)")
        axes[1, j].set(xlabel="KL(pi || pi_init) (nats, held out)", ylabel="evaluator: the second reward model")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"The paper's regime: {iters} iterations against the proxy, {len(seeds)} seed(s)\nthe held-out scores "
                 "against the KL over training (mean over seeds; dot: the last evaluation)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def paper_sweep(cfg):
    """The two reward models, the runs, the tables and the figure. Returns the markdown and the figure's path."""
    import train
    shared = paper_prepare(cfg)
    if cfg.run:
        paper_run_all(cfg, shared)
    lrs, seeds, iters, eval_every, eval_samples = paper_budget(cfg)
    rms = {}
    for key in ("reward_model", "evaluator"):
        with open(os.path.join(shared[key], "metrics.json")) as f:
            rms[key] = json.load(f)
    about = lambda rm: (f"accuracy {rm['accuracy']:.3f} on {rm['pairs']} held-out pairs"  # noqa: E731
                        + (f", Spearman {rm['spearman']:.3f} with the task's reward" if "spearman" in rm else ""))
    spread = (f"+- is the standard error over seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}")
    text = "\n".join([
        f"## The paper's regime: {iters} iterations against a learned reward model, judged by a second one and by the "
        "truth", "",
        f"The proxy: {about(rms['reward_model'])}. The evaluator: {about(rms['evaluator'])}. Responses of "
        f"{shared.get('max_new_tokens', train.Config.max_new_tokens)} tokens; held-out scores from {eval_samples} "
        f"responses to the held-out prompts every {eval_every} iterations; {spread}. The scores and the last KL are "
        "held-out ones, the largest KL and distinct-2 the training batches'. Diverged: stopped by non-finite steps, or "
        f"a 10-iteration mean KL above {DIVERGED_KL:g} nats.", "",
        paper_table(cfg), "", "How the evaluator, the truth and the proxy rank the algorithms (the last held-out "
        "scores, means over seeds):", "", paper_rankings(cfg), ""])
    return text, paper_plot(cfg, os.path.join(cfg.out_dir, "paper.png"))


def compare(cfg):
    t0 = time.time()
    if "paper" in cfg.settings.split(","):            # its own runs, tables and figure (paper_sweep, above)
        text, path = paper_sweep(cfg)
        with open(os.path.join(cfg.out_dir, "paper.md"), "w") as f:
            f.write(text)
        print(text + f"\nwrote {os.path.join(cfg.out_dir, 'paper.md')}" + (f", {path}" if path else "")
              + f" in {(time.time() - t0) / 60:.1f} min")
        if cfg.settings == "paper":
            return text
        cfg = dataclasses.replace(cfg, settings=",".join(s for s in cfg.settings.split(",") if s != "paper"))
    if "rm" in cfg.settings.split(","):               # its own runs, table and plot (rm_sweep, above)
        text, path = rm_sweep(cfg)
        with open(os.path.join(cfg.out_dir, "rm.md"), "w") as f:
            f.write(text)
        print(text + f"\nwrote {os.path.join(cfg.out_dir, 'rm.md')}" + (f", {path}" if path else "")
              + f" in {(time.time() - t0) / 60:.1f} min")
        if cfg.settings == "rm":
            return text
        cfg = dataclasses.replace(cfg, settings=",".join(s for s in cfg.settings.split(",") if s != "rm"))
    runs, main_iters, grid_iters, short_iters, lrs = plan(cfg)
    if cfg.run:
        run_all(cfg, runs)
    seeds, chosen = range(1 if cfg.quick else cfg.seeds), cfg.settings.split(",")
    first_setting = "main" if {"main", "grid"} & set(chosen) else "short"
    short_algo = "apa" if "short" in chosen else "rloo"  # the first run of the short setting (kl alone runs no APA)
    first_run = run_dir(cfg, first_setting, "apa" if first_setting == "main" else short_algo, cfg.lr, 0)
    first = (read_rows(first_run) or [None])[0]
    if first is None:
        raise ValueError(f"{first_run} holds no results, and the tables start from it"
                         + ("" if cfg.run else ": run without --run=0 first"))
    text = [f"# APA, PPO, AWR, GRPO and RLOO on the embedded task{' (quick)' if cfg.quick else ''}", "",
            f"lambda 0.1 for all; seeds 0-{len(seeds) - 1}; +- is the standard deviation over seeds. "
            f"J* = {first['jstar']:.4f} +- {first['jstar_se']:.4f} (standard error). Final values: means over "
            f"the last 20 iterations. Runs (or their cached results) took {(time.time() - t0) / 60:.1f} min.", ""]
    if "main" in chosen:
        text += [f"## Main: lr {cfg.lr:g}, {main_iters} iterations x {first['samples']} samples", "",
                 table(cfg, "main", cfg.lr, main_iters, seeds), ""]
    if "grid" in chosen:
        text += [f"## Stability map: final gap (KL max: largest 10-iteration mean over seeds), {grid_iters} iterations",
                 "", grid_table(cfg, lrs, grid_iters, seeds), ""]
    short = read_rows(run_dir(cfg, "short", short_algo, cfg.lr, 0))
    marks = [r["samples"] for r in short if "gap_exact" in r]        # where train.py computed the exact gap
    exact_note = (f"The gap is exact: J* = {short[0]['jstar_exact']:.4f} by enumeration, and J of the policy every "
                  f"{marks[-1] - marks[-2]} samples, so the samples to a quarter of the gap come in steps of that size."
                  if len(marks) > 2 else f"The gap is the sampled one, against J* = {short[0]['jstar']:.4f} estimated."
                  if short else "")
    if short_iters and short and "short" in chosen:
        text += [f"## Short responses: {cfg.short_tokens} tokens, lr {cfg.lr:g}, {short_iters} iterations", "",
                 exact_note, "", table(cfg, "short", cfg.lr, short_iters, seeds), "",
                 "## Which algorithms reach pi*", "",
                 "The fixed point each converges to in theory (derived in docs/theory.md, checked by "
                 "enumeration), and the final gap of the short-response runs above.", "",
                 fixed_point_table(cfg, cfg.lr, short_iters, seeds), ""]
    if short_iters and short and "kl" in chosen:
        text += [f"## Where the KL goes: GRPO, Dr. GRPO and RLOO with each place for the KL (--kl), "
                 f"{cfg.short_tokens}-token responses, lr {cfg.lr:g}, {short_iters} iterations", "",
                 exact_note, "The fixed points are derived in docs/theory.md, section 8.", "",
                 kl_table(cfg, cfg.lr, short_iters, seeds), ""]
    text = "\n".join(text)
    print(text)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(text)
    def curves(setting, iters):                        # the finished runs of a setting at cfg.lr
        loaded = [load_run(run_dir(cfg, setting, a, cfg.lr, s)) for a in algos(setting) for s in seeds]
        return [(st, rows[:iters]) for st, rows in loaded if len(rows) >= iters]
    plots = []
    main_curves = curves("main", main_iters) if "main" in chosen else []
    if main_curves:                                    # none yet with --run=0 on a sweep under way
        plots.append(plot_curves(main_curves, os.path.join(cfg.out_dir, "compare.png")))
    if "grid" in chosen:
        plots.append(plot_stability(cfg, lrs, grid_iters, seeds, os.path.join(cfg.out_dir, "stability.png")))
    short_curves = curves("short", short_iters) if short_iters and "short" in chosen else []
    if short_curves:
        plots.append(plot_curves(short_curves, os.path.join(cfg.out_dir, "compare_short.png"), "short responses: "))
    print(f"wrote {os.path.join(cfg.out_dir, 'compare.md')}" + "".join(f", {p}" for p in plots if p)
          + f" in {(time.time() - t0) / 60:.1f} min")
    return text


def plot_runs(paths):
    """--plot: the curves of these metrics files or run directories, in metrics.png beside the first."""
    runs = [load_run(p) for p in paths]
    if not all(rows for _, rows in runs):
        raise ValueError(f"no metrics in {', '.join(p for p, (_, r) in zip(paths, runs) if not r)}")
    for path, (_, rows) in zip(paths, runs):
        lacking = [k for k in ("samples", "reward", "kl") if not all(k in r for r in rows)]
        lacking += [] if any(gap_key(rows) in r for r in rows) else ["gap"]
        if lacking:
            raise ValueError(f"{path} has rows without {', '.join(lacking)}: the plot needs samples, reward, kl and "
                             "gap (train.py logs the gap unless --jstar_samples=0)")
    folder = paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0]) or "."
    out = plot_curves(runs, os.path.join(folder, "metrics.png"))
    if out:
        print(f"wrote {out}")
    return out


def main(argv=None):
    """Every failure ends in one line `error: ...` and exit status 1 (APA_DEBUG=1: the full traceback);
    Ctrl-C ends with status 130 and says how to continue."""
    from lab import cli, runs
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    cfg = None
    with cli.one_line_errors(lambda: "interrupted" + ("" if cfg is None or cfg.plot else ": the same command "
                                "continues the sweep (the runs done are kept, the others resume from their last checkpoint)")):
        cfg = cli.parse_args(CompareConfig, sys.argv[1:] if argv is None else argv, __doc__)
        validate(cfg)
        if cfg.plot:
            return plot_runs(cfg.plot.split(","))
        if cfg.quick and cfg.out_dir == CompareConfig.out_dir:
            cfg.out_dir = "out/compare_quick"
        if cfg.quick and cfg.lr == CompareConfig.lr:
            cfg.lr = 1e-3                               # the tiny model moves in a few iterations
        if "rm" in cfg.settings.split(","):
            rm_validate(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
        with runs.exclusive(cfg.out_dir) if cfg.run else contextlib.nullcontext():  # one sweep at a time in it
            return compare(cfg)


if __name__ == "__main__":
    main()
