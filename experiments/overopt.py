"""
Reward over-optimisation, measured exactly: RL against a reward model learned from preferences (reward_model.py), and
judged by the embedded task's own reward, which the runs never train on. With 2-token responses the exact evaluator
lists every response, so each run's judge score, its KL to pi_init and the frontier (the best judge score that any
policy reaches at the same KL) are exact numbers, and over-optimisation is one of them: the judge score lost against
the frontier. The figure is Gao, Schulman and Hilton's (2022, arXiv 2210.10760): the judge ("gold") score against the
KL, for each algorithm, with the frontier drawn.

Paper: Zhu et al. 2023, arXiv 2306.02231, Sec. 5: "APA consistently outperforms PPO by a large margin when a separate
reward model is employed as the evaluator", and keeps a steadier control of the KL to pi_init.
Run:  python -m experiments.compare --settings=rm     the reward model, then the sweep (docs/experiments.md)
      python -m experiments.compare --settings=rm --quick=1   a smoke test on a tiny model

What it runs. Every run is train.train with a Config; nothing of training is written here.
1. The reward model: reward_model.py's default (2,000 pairs of pi_init's responses labelled by the simulated
   annotator at beta 1, 500 held out), trained once into out_dir/rm/reward_model.
2. The algorithms of RM_ALGOS at each lambda of --rm_lams, seeds 0 .. seeds-1, 2-token responses, against the reward
   model (the proxy), with the task's reward as the judge (--gold_fn): out_dir/rm/<algo>_lam<lambda>_seed<seed>/.
3. The table: the final exact proxy score, judge score, KL, distinct-2 and the judge score lost against the frontier;
   the plot: rm.png.
Where this departs from the paper: a 0.44M-parameter GPT, 2-token responses on 8 prompts (every fifth opening of the
task, so that the exact evaluator's 730,000 responses are scored by the reward model in about a minute), a simulated
annotator, and the task's reward as the judge in place of people.
"""
import json
import os

import numpy as np

from experiments import compare

RM_ALGOS = ["apa", "apa_paper", "ppo", "awr", "grpo", "rloo"]
QUICK_RM = ["--pairs=200", "--epochs=1"]                 # reward_model.py's overrides under --quick


def folder(cfg):
    return os.path.join(cfg.out_dir, "rm")


def run_dir(cfg, algo, lam, seed):
    return os.path.join(folder(cfg), f"{algo}_lam{lam:g}_seed{seed}")


def lams(cfg):
    return [float(x) for x in cfg.rm_lams.split(",")]


def prepare(cfg):
    """The prompts files (every fifth training and held-out opening) and the reward model, trained once. Returns the
    train.Config overrides that every run shares."""
    import data
    import reward_model
    os.makedirs(folder(cfg), exist_ok=True)
    files = {}
    n = 2 if cfg.quick else 8                           # --quick: 2 prompts, whose responses score in seconds
    for name, prompts in (("prompts", data.task_prompts()[::5][:n]), ("eval_prompts", data.task_eval_prompts()[::5][:n])):
        files[name] = os.path.join(folder(cfg), f"{name}.txt")
        with open(files[name], "w") as f:
            f.write("\n".join(prompts) + "\n")
    model = {k: v for k, v in compare.QUICK.items() if k in ("n_layer", "n_head", "n_embd", "block_size", "sft_steps",
                                                              "sft_lr")} if cfg.quick else {}
    rm_dir = os.path.join(folder(cfg), "reward_model")
    if not os.path.exists(os.path.join(rm_dir, "metrics.json")):
        reward_model.main([f"--out_dir={rm_dir}", f"--sft_dir={cfg.sft_dir}", "--device=cpu"]
                          + [f"--{k}={v}" for k, v in model.items()] + (QUICK_RM if cfg.quick else []))
    return dict(model, **files, reward_model=rm_dir, gold_fn="data:sentiment_reward", max_new_tokens=2,
                jstar_samples=0, exact_every=1 if cfg.quick else 10, eval_every=50, eval_samples=64, sft_dir=cfg.sft_dir,
                target_kl=0.0,
                device="cpu", **({"batch_size": 16, "minibatch_size": 8} if cfg.quick else {}))


def plan(cfg):
    """The runs: {(algo, lambda, seed): iterations}."""
    iters = 3 if cfg.quick else cfg.rm_iters
    return {(algo, lam, seed): iters for lam in lams(cfg) for seed in range(1 if cfg.quick else cfg.seeds)
            for algo in RM_ALGOS}


def run_all(cfg, shared, runs):
    todo = [(k, n) for k, n in runs.items() if not compare.is_done(run_dir(cfg, *k), n)]
    print(f"{len(runs)} runs against the reward model, {len(runs) - len(todo)} already done, {len(todo)} to run, "
          f"{cfg.workers} at a time")
    jobs = [(dict(shared, **compare.ALGOS[algo], lam=lam, seed=seed, lr=cfg.lr), run_dir(cfg, algo, lam, seed), iters,
             f"[{i + 1}/{len(todo)}] rm {algo} lambda {lam:g} seed {seed}")
            for i, ((algo, lam, seed), iters) in enumerate(todo)]
    compare.run_jobs(cfg, jobs)


def final(rows):
    """A run's last exact evaluation, with distinct-2 averaged over its last 20 iterations."""
    exact = [r for r in rows if "gold_exact" in r]
    return dict(exact[-1], distinct2=float(np.mean([r["distinct2"] for r in rows[-20:]]))) if exact else None


def table(cfg, iters):
    """Per algorithm and lambda: the final exact proxy score, judge score, KL, distinct-2 and judge score lost
    against the frontier, mean +- std over seeds."""
    seeds = range(1 if cfg.quick else cfg.seeds)
    head = ["| algorithm | lambda | proxy (reward model) | judge (true reward) | KL | distinct-2 | judge lost to the "
            "frontier |", "|---|---|---|---|---|---|---|"]
    lines = []
    for algo in RM_ALGOS:
        for lam in lams(cfg):
            ends = [final(compare.read_rows(run_dir(cfg, algo, lam, s))[:iters]) for s in seeds]
            ends = [e for e in ends if e]
            if not ends:
                continue
            cell = lambda key, fmt: compare.stat([e[key] for e in ends], fmt)  # noqa: E731
            lines.append(f"| {compare.name(algo)} | {lam:g} | {cell('reward_exact', '.3f')} | {cell('gold_exact', '.3f')} "
                         f"| {cell('kl_exact', '.2f')} | {cell('distinct2', '.3f')} | {cell('gold_lost_exact', '.3f')} |")
    return "\n".join(head + lines)


def plot(cfg, iters, path):
    """The judge score against the KL to pi_init, every exact evaluation of every run (the final ones larger), one
    colour per algorithm, and the frontier through the (KL, frontier) points the runs logged. Returns the path, or None
    without matplotlib."""
    plt = compare.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    frontier = []
    for i, algo in enumerate(RM_ALGOS):
        for lam in lams(cfg):
            for seed in range(1 if cfg.quick else cfg.seeds):
                rows = [r for r in compare.read_rows(run_dir(cfg, algo, lam, seed))[:iters] if "gold_exact" in r]
                if not rows:
                    continue
                frontier += [(r["kl_exact"], r["gold_frontier_exact"]) for r in rows]
                label = compare.name(algo) if (lam, seed) == (lams(cfg)[0], 0) else None
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


def sweep(cfg):
    """The reward model, the runs, the table and the plot. Returns the markdown section."""
    shared = prepare(cfg)
    runs = plan(cfg)
    iters = next(iter(runs.values()))
    if cfg.run:
        run_all(cfg, shared, runs)
    with open(os.path.join(shared["reward_model"], "metrics.json")) as f:
        rm = json.load(f)
    text = "\n".join([
        f"## Over-optimisation: RL against a learned reward model, judged by the task's reward, {iters} iterations", "",
        f"The reward model: {rm['pairs']} held-out pairs, accuracy {rm['accuracy']:.3f} against the annotator's labels"
        + (f" and {rm['accuracy_true']:.3f} against the true reward's order, Spearman {rm['spearman']:.3f}"
           if "accuracy_true" in rm else "") + ". Every number below is exact (every 2-token response listed), at the "
        "last iteration; +- is the standard deviation over seeds. The frontier is the best judge score that any policy "
        "reaches at the same KL to pi_init.", "", table(cfg, iters), ""])
    path = plot(cfg, iters, os.path.join(cfg.out_dir, "rm.png"))
    return text, path

