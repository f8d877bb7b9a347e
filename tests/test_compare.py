"""
Tests of experiments/compare.py: the quick sweep end to end (every algorithm, setting and output), its cache,
--plot on a run directory, with and without matplotlib, and every failure as one line `error: ...`
(bad settings, damaged or half-written files). Run: pytest -q tests/test_compare.py
"""
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from experiments import compare
from test_cli import one_line_error


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    text = compare.main(["--quick=1", f"--out_dir={out}", f"--sft_dir={out / 'sft'}", "--workers=2"])  # as the sweep runs
    return out, text


def test_quick_sweep_writes_table_and_plots(quick):
    out, text = quick
    for algo in compare.NAMES:                                       # main table, stability map, short responses,
        settings = compare.ONLY.get(algo, ("main", "grid", "short"))  # and the short ones again in "which reach pi*";
        in_kl_table = 5 * (algo in compare.KL_DEFAULT)                # GRPO's, Dr. GRPO's and RLOO's rows of the kl one
        expected = 0 if settings in (("kl",), ("paper",)) else len(settings) + ("short" in settings) + in_kl_table
        assert text.count(f"| {compare.name(algo)} |") == expected, algo
    rows = [line for line in text.split("## Where the KL goes")[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 15 and all("not run" not in row for row in rows)  # every algorithm x place for the KL
    assert "nan" not in text
    assert open(out / "compare.md").read() == text
    pytest.importorskip("matplotlib")                               # an optional extra: the plots need it
    for png in ("compare.png", "stability.png", "compare_short.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finished_runs_are_not_run_again(quick, capsys):
    out, text = quick
    before = {p: os.path.getmtime(p) for p in out.glob("*/*/metrics.jsonl")}
    assert len(before) == 36                                        # 7 algorithms x (2 lrs + short), the guard x 2
    again = compare.main(["--quick=1", f"--out_dir={out}", f"--sft_dir={out / 'sft'}", "--workers=1"])  # lrs, Dr. GRPO
    assert "36 runs, 36 already done, 0 to run" in capsys.readouterr().out                              # x short, and
    # the 12 places for the KL that are not GRPO's, Dr. GRPO's or RLOO's own
    assert {p: os.path.getmtime(p) for p in before} == before
    assert again.split("\n", 4)[4:] == text.split("\n", 4)[4:]      # the same table (the header has the time)


def test_each_run_is_its_algorithm_and_only_the_guard_row_has_the_guard(quick):
    out, _ = quick
    runs = [p for setting in ("main", "short", "kl") for p in (out / setting).glob("*/config.json")]
    assert len(runs) == 36
    for path in runs:
        algo = path.parent.name.split("_lr")[0]
        conf = json.loads(path.read_text())
        assert all(conf[k] == v for k, v in compare.ALGOS[algo].items()), path
        assert conf["target_kl"] == (0.2 if algo == "apa_guard" else 0.0), path
        assert compare.algo_name(conf) == compare.name(algo)            # what --plot calls it
        assert conf["max_new_tokens"] == (2 if path.parent.parent.name in ("short", "kl") else 8), path


def test_the_kl_tables_own_places_are_train_pys_defaults():
    import train                                                     # compare.py imports no torch to be loaded
    for base, own in compare.KL_DEFAULT.items():
        assert train.resolve(train.Config(**compare.ALGOS[base])).kl == own, base


def test_plot_labels_a_run_with_its_own_group_size():
    """--plot names a run from its own config.json: a GRPO run of 8 responses per prompt is GRPO (k = 8)."""
    assert compare.algo_name({"algo": "grpo", "group_size": 8}) == "GRPO (k = 8)"
    assert compare.algo_name({"algo": "grpo", "group_size": 8, "grpo_std": False, "kl": "k2"}) == \
        "Dr. GRPO (k = 8), KL k2 in the loss"
    assert compare.algo_name({"algo": "rloo"}) == "RLOO (k = 4)"        # an older config.json: the defaults
    assert compare.algo_name({"algo": "apa", "apa_clip": 0.5}) == "APA, bounded (c = 0.5)"


def test_plot_of_a_run_directory(quick, capsys):
    pytest.importorskip("matplotlib")
    out, _ = quick
    run = out / "main" / "awr_lr0.001_seed0"
    assert compare.main([f"--plot={run / 'metrics.jsonl'},{out / 'main' / 'ppo_lr0.001_seed0'}"]) == str(run / "metrics.png")
    with open(run / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_run(run, rows(12))
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib raises ImportError
    assert compare.main([f"--plot={run}"]) is None
    assert capsys.readouterr().out == "matplotlib is not installed: no plot (pip install matplotlib)\n"
    assert not os.path.exists(run / "metrics.png")


def test_the_plan_runs_each_main_run_as_long_as_its_longest_table_needs():
    """The main table's runs at lr are also the stability map's column at lr: they run the longer of the two
    lengths; the map's other runs run grid_iters."""
    cfg = compare.CompareConfig(out_dir="unused", settings="main,grid", seeds=2, lr=1e-3, lrs="1e-3,3e-3", iters=10,
                                grid_iters=5)
    runs = compare.plan(cfg)[0]
    expected = {("main", a, 1e-3, s): 10 for s in range(2) for a in compare.algos("main")}
    for lr in (1e-3, 3e-3):                                           # the map's own runs (the guard row's)
        for key in [("main", a, lr, s) for s in range(2) for a in compare.algos("grid")]:
            expected.setdefault(key, 5)
    assert runs == expected


def test_jstar_is_estimated_once_per_pi_init_data_and_lambda():
    import train
    base = train.Config()
    same = [dataclasses.replace(base, algo=algo, lr=lr, seed=seed, out_dir=f"out/{algo}")  # RL settings: one estimate
            for algo, lr, seed in (("apa", 3e-5, 0), ("ppo", 1e-4, 1), ("awr", 3e-4, 2))]
    assert len({compare.jstar_key(cfg) for cfg in [base] + same}) == 1
    for change in (dict(lam=0.2), dict(max_new_tokens=2), dict(n_head=2), dict(sft_lr=3e-3), dict(prompts="p.txt"),
                   dict(sft_steps=100), dict(n_layer=1), dict(n_embd=64), dict(block_size=32), dict(init="m"),
                   dict(tokenizer="gpt2"), dict(reward_fn="m:f"), dict(reward_model="rm"), dict(jstar_samples=64)):
        assert compare.jstar_key(dataclasses.replace(base, **change)) != compare.jstar_key(base)  # a new estimate


def test_a_run_handed_what_is_known_uses_it_and_trains_as_one_that_computes_it(quick, tmp_path):
    """experiments/compare.py hands a run the J* and the exact evaluator's responses that an earlier run of the same pi_init,
    data and lambda computed (train.train's known). A run uses what it is handed, computes the rest and adds it, and
    trains exactly as one that computes everything itself."""
    import train
    out, _ = quick
    (tmp_path / "prompts.txt").write_text("the movie was\nthe plot felt\n")  # two prompts: few responses to list
    cfg = dataclasses.replace(train.Config(), **dict(compare.QUICK, max_new_tokens=2), lr=1e-3, iters=2,
                              sft_dir=str(out / "sft"), sample_every=0, target_kl=0.0, exact_every=1,
                              prompts=str(tmp_path / "prompts.txt"))
    known = {}
    computed = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "a")), known)
    assert known["jstar"] == (computed[0]["jstar"], computed[0]["jstar_se"]) and known["space"] is not None
    space = dict(known["space"], rewards=2 * known["space"]["rewards"])  # not the task's: seen in gap_exact
    handed = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), {"jstar": (1.5, 0.25), "space": space})
    assert [(r["jstar"], r["jstar_se"]) for r in handed] == [(1.5, 0.25)] * 2
    assert [r["gap"] for r in handed] == [1.5 - r["J"] for r in handed]
    assert all(h["reward_exact"] == pytest.approx(2 * c["reward_exact"]) for h, c in zip(handed, computed))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("ms", "mem_mb", "jstar", "jstar_se", "gap")  # noqa: E731
                        and not k.endswith("_exact")} for r in h]
    assert strip(computed) == strip(handed)                          # J*'s own draws change no training number
    rows = [json.loads(line) for path in (out / "main").glob("*/metrics.jsonl") for line in open(path)]
    assert len({(r["jstar"], r["jstar_se"]) for r in rows}) == 1     # one pi_init, data and lambda: one J*


# ---------------------------------------------------------------------------------------------
# failures: one line each, no traceback


def error_of(argv):
    """The one-line message that compare.main ends with."""
    return one_line_error(compare.main, argv)


@pytest.mark.parametrize("flag, message", [
    ("--seeds=0", "seeds must be > 0, got 0"),
    ("--lrs=abc", "lrs must be comma-separated learning rates in (0, 0.1], got 'abc'"),
    ("--lrs=1e-4,nan", "lrs must be comma-separated learning rates in (0, 0.1], got 'nan'"),
    ("--lrs=1e-4,", "got ''"),
    ("--lr=0", "lr must be in (0, 0.1]"),
    ("--lr=inf", "lr must be a finite number, got inf"),
    ("--iters=0", "iters must be > 0, got 0"),
    ("--grid_iters=-1", "grid_iters must be > 0, got -1"),
    ("--short_tokens=0", "short_tokens must be > 0"),
    ("--short_iters=-1", "short_iters must be >= 0"),
    ("--workers=0", "workers must be > 0, got 0"),
    ("--sft_dir=", "sft_dir must be a folder, got ''"),
    ("--plot=no/such/metrics.jsonl", "'no/such/metrics.jsonl' does not exist"),
    ("--settings=main,bogus", "settings must be a comma-separated choice of main, grid, short, kl, rm, paper, got "
                              "'main,bogus'"),
    ("--settings=", "settings must be a comma-separated choice of main, grid, short, kl, rm, paper, got ''"),
    ("--paper_lrs=1e-4,0", "paper_lrs must be comma-separated learning rates in (0, 0.1], got '0'"),
    ("--paper_iters=0", "paper_iters must be > 0, got 0"),
    ("--paper_eval_every=300", "paper_eval_every must be in [1, paper_iters=150]"),
    ("--paper_eval_samples=0", "paper_eval_samples must be > 0, got 0"),
    ("--settings=kl --short_iters=0", "--settings=kl asks for kl, runs of short responses, but --short_iters=0 skips"),
    ("--short_iters=0", "--settings=main,grid,short,kl asks for kl and short, runs of short responses, but"),
])
def test_a_bad_setting_is_one_line(tmp_path, flag, message):
    assert message in error_of([f"--out_dir={tmp_path}", "--run=0", *flag.split(" ")])  # --run=0: nothing trains


def test_an_empty_out_dir_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                     # unchecked, it would write into the current folder
    assert error_of(["--out_dir=", "--run=0"]) == "error: out_dir must be a folder, got ''"


def test_a_bad_setting_on_the_command_line_is_one_line_on_stderr_with_exit_status_1(tmp_path):
    root = os.path.dirname(os.path.dirname(compare.__file__))
    out = subprocess.run([sys.executable, "-m", "experiments.compare", "--seeds=0"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: seeds must be > 0, got 0\n"


def test_a_second_sweep_in_the_same_out_dir_is_refused_before_any_work(tmp_path):
    """Two sweeps in one out_dir would run the same runs at once and mix their metrics: the second is refused, as a
    second train.py run is, with the lock of lab/runs.py."""
    from lab import runs
    with runs.exclusive(str(tmp_path)):                              # as a sweep in another process holds it
        assert f"another run is using {tmp_path}" in error_of(["--quick=1", f"--out_dir={tmp_path}",
                                                               f"--sft_dir={tmp_path / 'sft'}"])
    assert os.listdir(tmp_path) == []                                # not even pi_init was built


def test_tables_without_runs_say_so(tmp_path):
    assert "holds no results, and the tables start from it: run without --run=0 first" in error_of(
        [f"--out_dir={tmp_path}", "--run=0"])


def test_apa_debug_shows_the_traceback_and_anything_unexpected_is_one_line_too(tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("a message\nof two lines")
    monkeypatch.setattr(compare, "compare", broken)
    assert error_of([f"--out_dir={tmp_path}"]) == ("error: RuntimeError: a message of two lines "
                                                   "(APA_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("APA_DEBUG", "1")
    with pytest.raises(RuntimeError):
        compare.main([f"--out_dir={tmp_path}"])


def test_ctrl_c_exits_130_and_says_the_same_command_continues(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "compare", interrupted)
    with pytest.raises(SystemExit) as e:
        compare.main([f"--out_dir={tmp_path}"])
    assert e.value.code == 130
    assert "interrupted: the same command continues the sweep" in capsys.readouterr().err


ROW = dict(reward=0.1, kl=0.05, J=0.6, gap=0.1, jstar=0.7, jstar_se=0.01, entropy=2.0, distinct2=0.3, ms=10.0)


def write_run(folder, lines, config=None):
    """A run directory as train.py leaves it: metrics.jsonl (these lines, as written) and config.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(lines))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(json.dumps(dict(algo="apa", lr=3e-5, max_new_tokens=8, lam=0.1, seed=0)) if config is None else config)
    return os.path.join(folder, "metrics.jsonl")


def rows(n):
    return [json.dumps(dict(ROW, iter=i, samples=16 * i, reward=0.1 * i)) + "\n" for i in range(1, n + 1)]


def test_plot_skips_a_half_written_last_line_with_a_note(tmp_path, capsys):
    path = write_run(tmp_path / "run", rows(6) + ['{"iter": 7, "rew'])  # a run stopped mid-write
    out = compare.main([f"--plot={path}"])
    note = f"note: {path}: its last line is half-written (a run stopped mid-write): skipped"
    assert note in capsys.readouterr().out.splitlines()
    pytest.importorskip("matplotlib")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_stopped_mid_write_is_not_done_and_resumes(tmp_path):
    """A run with all its rows is done, one stopped mid-write is not; a diverged run (failed.txt) is done, so that the
    same command does not run it again."""
    run = tmp_path / "run"
    write_run(run, rows(6) + ['{"iter": 7, "rew'])
    assert compare.is_done(str(run), 6) and not compare.is_done(str(run), 7)
    (run / "failed.txt").write_text("3 non-finite updates in a row\n")
    assert compare.is_done(str(run), 7)


@pytest.mark.parametrize("lines, message", [
    (rows(2) + ['{"iter": 3, "rew\n'] + rows(2), "metrics.jsonl line 3 is not JSON ("),
    (rows(2) + ["[1, 2]\n"], "metrics.jsonl line 3 is not a row of metrics (a JSON object): '[1, 2]'"),
    (["no metrics here\n", "at all\n"], "metrics.jsonl line 1 is not JSON (Expecting value"),
    ([], "error: no metrics in "),
    ([json.dumps(dict(iter=1, reward=0.1)) + "\n"], "has rows without samples, kl, gap: the plot needs"),
    ([json.dumps(dict({k: v for k, v in ROW.items() if k != "gap"}, iter=1, samples=16)) + "\n"],
     "has rows without gap"),                                      # a run with --jstar_samples=0
])
def test_plot_of_damaged_or_foreign_metrics_is_one_line(tmp_path, lines, message):
    path = write_run(tmp_path / "run", lines)
    assert message in error_of([f"--plot={path}"])


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    assert error_of([f"--plot={tmp_path}"]) == f"error: no metrics in {tmp_path}"


@pytest.mark.parametrize("config", ['{"algo": "apa", "lr": 3e-', "[1, 2]"])
def test_plot_with_a_damaged_config_json_is_one_line(tmp_path, config):
    path = write_run(tmp_path / "run", rows(3), config)
    assert f"{tmp_path / 'run' / 'config.json'} is damaged (" in error_of([f"--plot={path}"])


def slow_summary(rows, key):
    """compare.summary by Python loops: means over the last 20 iterations; the largest 10-iteration mean of the KL;
    the samples at which the gap (key: gap_exact as logged, or the sampled gap's 10-iteration moving mean, which
    starts at iteration 10) first falls to a quarter of its first value."""
    tail = rows[-20:]
    out = {k: sum(r[k] for r in tail) / len(tail) for k in ("reward", "kl", "distinct2", "entropy")}
    out["gap"] = statistics.mean(r[key] for r in tail if key in r)
    out["kl_max"] = max(statistics.mean(r["kl"] for r in rows[i - 10:i]) for i in range(10, len(rows) + 1))
    if key == "gap_exact":
        curve = [(r["samples"], r[key]) for r in rows if key in r]
    else:
        curve = [(rows[i - 1]["samples"], statistics.mean(r[key] for r in rows[i - 10:i]))
                 for i in range(10, len(rows) + 1)]
    out["samples_to_quarter_gap"] = next(x for x, y in curve if y <= curve[0][1] / 4)
    return out


def synthetic_run(n, seed, exact=False):
    """n rows of a run whose every number changes with the iteration and the seed: the KL peaks mid-run (highest in
    seed 1), the gap falls as 1/i, sampled every iteration, or as 1/sqrt(i), exact every 5 iterations."""
    rows = []
    for i in range(1, n + 1):
        gap = ({"gap_exact": i ** -0.5} if i == 1 or i % 5 == 0 else {}) if exact else {"gap": (1 + seed) / i}
        rows.append(dict({k: v for k, v in ROW.items() if k != "gap"}, iter=i, samples=16 * i, **gap,
                         reward=0.01 * i + 0.03 * seed, kl=0.1 + math.sin(i / 10) + seed * (i % 3),
                         distinct2=0.5 - 0.001 * i * (1 + seed), entropy=2 - 0.01 * i + 0.1 * seed))
    return rows


def test_the_summary_that_the_tables_are_built_from(tmp_path):
    """A run's final values are the means over its last 20 iterations, the largest KL its largest 10-iteration mean,
    and the samples to a quarter of the first gap are samples: against Python loops, on runs of 60 iterations whose
    numbers all change, with the sampled gap and with the exact one. The main table and the stability map show
    them over two seeds, as mean +- standard deviation."""
    for exact in (False, True):
        rows = synthetic_run(60, 0, exact)
        slow, fast = slow_summary(rows, "gap_exact" if exact else "gap"), compare.summary(rows)
        assert fast == pytest.approx(slow, rel=1e-12) and fast["samples_to_quarter_gap"] > 16 * 10
        kl = [r["kl"] for r in rows]
        slow_means = [statistics.mean(kl[i - 10:i]) for i in range(10, 61)]        # the 10-iteration means
        assert compare.moving_mean(kl) == pytest.approx(slow_means, rel=1e-12)
    # seeds 0 and 1 done, seed 2 still running (30 of 60 iterations), seed 3 stopped at iteration 40
    runs = [synthetic_run(60, seed) for seed in range(2)] + [synthetic_run(30, 2), synthetic_run(40, 3)]
    for seed, rows in enumerate(runs):
        write_run(tmp_path / "main" / f"apa_lr0.001_seed{seed}", [json.dumps(r) + "\n" for r in rows])
    (tmp_path / "main" / "apa_lr0.001_seed3" / "failed.txt").write_text("3 non-finite updates in a row\n")

    def cells_of(runs):
        slow = [slow_summary(rows, "gap") for rows in runs]
        return slow, [f"{statistics.mean(x[k] for x in slow):{f}} +- {statistics.stdev(x[k] for x in slow):{f}}"
                      for k, f in (("reward", ".3f"), ("kl", ".2f"), ("gap", ".3f"), ("distinct2", ".3f"),
                                   ("kl_max", ".2f"), ("samples_to_quarter_gap", ".0f"))]
    cfg = compare.CompareConfig(out_dir=str(tmp_path), lr=1e-3)
    table = compare.table(cfg, "main", 1e-3, 60, range(4)).splitlines()  # the done runs and the stopped one
    assert next(line for line in table if line.startswith("| APA ")) == \
        "| APA (3 of 4 seeds) (1 stopped) | " + " | ".join(cells_of([runs[0], runs[1], runs[3]])[1]) + " |"
    slow, cells = cells_of(runs[:2])
    table = compare.table(cfg, "main", 1e-3, 60, range(2)).splitlines()
    assert next(line for line in table if line.startswith("| APA |")) == "| APA | " + " | ".join(cells) + " |"
    grid = compare.grid_table(cfg, [1e-3], 60, range(2)).splitlines()
    assert next(line for line in grid if line.startswith("| APA |")) == \
        f"| APA | {cells[2]} (KL max {max(x['kl_max'] for x in slow):.1f}) |"


def test_the_short_and_kl_tables_show_each_runs_own_summary(tmp_path):
    """The tables "which algorithms reach pi*" and "where the KL goes" read each (setting, algorithm) its own run:
    runs whose numbers all differ, one seed each, against their summaries by Python loops (the exact gap)."""
    written = {}
    for j, (setting, algo) in enumerate([("short", a) for a in compare.algos("short")] +
                                        [("kl", a) for a in compare.algos("kl")]):
        rows = synthetic_run(40, j / 10, exact=True)
        write_run(tmp_path / setting / f"{algo}_lr0.001_seed0", [json.dumps(r) + "\n" for r in rows])
        written[setting, algo] = slow_summary(rows, "gap_exact")
    cfg = compare.CompareConfig(out_dir=str(tmp_path), lr=1e-3)
    lines = compare.fixed_point_table(cfg, 1e-3, 40, range(1)).splitlines()[2:]
    assert lines == [f"| {compare.name(a)} | {compare.FIXED_POINT[a]} | {written['short', a]['gap']:.3f} |"
                     for a in compare.algos("short")]
    rows = [line.split(" | ")[-2:] for line in compare.kl_table(cfg, 1e-3, 40, range(1)).splitlines()[2:]]
    expected = [written[("short", base) if kl == own else ("kl", f"{base}_{kl}")]
                for base, own in compare.KL_DEFAULT.items() for kl in compare.KL_PLACES]
    assert rows == [[f"{x['gap']:.3f}", f"{x['kl']:.2f} |"] for x in expected]


def test_the_rm_setting_trains_a_reward_model_and_measures_over_optimisation_exactly(tmp_path):
    """--settings=rm: a reward model learned from the simulated annotator's preferences, then every algorithm at every
    lambda against it, judged by the task's reward: a row of exact numbers each, the judge's loss against the frontier
    never negative, and the figure."""
    out = tmp_path / "rm"
    text = compare.main(["--quick=1", "--settings=rm", f"--out_dir={out}", f"--sft_dir={tmp_path / 'sft'}",
                         "--workers=1", "--rm_lams=0.03,0.3"])
    assert os.path.exists(out / "rm" / "reward_model" / "metrics.json") and open(out / "rm.md").read() == text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 * 2 and {row[1] for row in rows} == {"0.03", "0.3"}
    for row in rows:                                                 # proxy, judge, KL, distinct-2, judge lost
        values = [float(cell.split(" +- ")[0].strip(" |")) for cell in row[2:]]
        assert all(v == v for v in values) and values[2] >= -1e-9 and values[4] >= -1e-6
    metrics = [json.loads(line) for line in open(out / "rm" / "apa_lam0.03_seed0" / "metrics.jsonl")]
    assert metrics[-1]["gold_frontier_exact"] - metrics[-1]["gold_exact"] == pytest.approx(metrics[-1]["gold_lost_exact"])
    config = json.load(open(out / "rm" / "apa_lam0.03_seed0" / "config.json"))
    assert config["gold_fn"] == "data:sentiment_reward" and config["reward_model"].endswith("reward_model")
    pytest.importorskip("matplotlib")
    with open(out / "rm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def slow_paper_summary(rows, stopped):
    """compare.paper_summary by Python loops: the best and the last held-out gold score, the last held-out evaluator,
    proxy and KL, the largest 10-iteration mean of the training KL, whether it diverged, distinct-2 over the last 20."""
    held_out = [r for r in rows if "eval_gold" in r]
    n = min(10, len(rows))
    kl_max = max(statistics.mean(r["kl"] for r in rows[i - n:i]) for i in range(n, len(rows) + 1))
    return {"best_gold": max(r["eval_gold"] for r in held_out), "gold": held_out[-1]["eval_gold"],
            "evaluator": held_out[-1]["eval_evaluator"], "reward": held_out[-1]["eval_reward"],
            "kl": held_out[-1]["eval_kl"], "kl_max": kl_max,
            "distinct2": statistics.mean(r["distinct2"] for r in rows[-20:]),
            "diverged": stopped or kl_max > compare.DIVERGED_KL}


def paper_cells(summaries):
    """A row's cells as the table should show them: mean +- standard error over seeds (the mean alone for one)."""
    cells = []
    for key, fmt in (("best_gold", ".3f"), ("gold", ".3f"), ("evaluator", ".3f"), ("reward", ".3f"), ("kl", ".2f"),
                     ("kl_max", ".2f"), ("distinct2", ".3f")):
        values = [s[key] for s in summaries]
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        cells.append(f"{statistics.mean(values):{fmt}}" + (f" +- {se:{fmt}}" if se is not None else ""))
    return cells + [f"{sum(bool(s['diverged']) for s in summaries)} of {len(summaries)}"]


def paper_rows(lines):
    return {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in lines if line.startswith("| ")
            and "---" not in line and not line.startswith("| algorithm")}


def test_the_paper_tables_show_each_runs_own_numbers_with_standard_errors(tmp_path):
    """The paper setting's table: per algorithm and learning rate, the best held-out gold score along the way, the last
    held-out gold, evaluator, proxy and KL, the largest 10-iteration mean KL, distinct-2 (means +- standard errors over
    3 seeds) and the runs that diverged (stopped, or KL above DIVERGED_KL), against Python loops on runs whose numbers
    all differ; the rankings: the evaluator's order, gold's and the proxy's, and whether the first two agree."""
    cfg = compare.CompareConfig(out_dir=str(tmp_path), paper_lrs="1e-4,3e-4", paper_iters=30, paper_eval_every=5)
    expected = {}
    for a, algo in enumerate(compare.PAPER_ALGOS):
        for j, lr in enumerate((1e-4, 3e-4)):
            summaries = []
            for seed in range(3):
                rows, stopped = [], (algo, lr, seed) == ("ppo", 3e-4, 2)        # one run stopped, at iteration 20
                for i in range(1, (20 if stopped else 30) + 1):
                    row = dict(ROW, iter=i, samples=64 * i, kl=0.2 * i * (1 + a + 20 * j * (algo == "apa_paper"))
                               / 10 + seed * (i % 3), distinct2=0.9 - 0.01 * i - 0.02 * seed)
                    if i == 1 or i % 5 == 0:                                 # the held-out evaluations
                        gold = 0.3 + 0.1 * math.sin(i / 7 + a) - 0.05 * seed * j
                        row.update(eval_gold=gold, eval_evaluator=gold + 0.1 if j == 0 else  # agrees at the first lr
                                   0.5 - 0.1 * a + 0.01 * i * (a == 3) + 0.02 * seed,
                                   eval_reward=0.6 - 0.01 * i * (1 + a) + j, eval_kl=0.05 * i * (1 + a) + seed)
                    rows.append(row)
                folder = tmp_path / "paper" / f"{algo}_lr{lr:g}_seed{seed}"
                write_run(folder, [json.dumps(r) + "\n" for r in rows])
                if stopped:
                    (folder / "failed.txt").write_text("3 non-finite updates in a row\n")
                summaries.append(slow_paper_summary(rows, stopped))
            expected[f"| {compare.name(algo)}", f"{lr:g}"] = summaries
    table = paper_rows(compare.paper_table(cfg).splitlines())
    assert table == {k: paper_cells(s)[:-1] + [paper_cells(s)[-1] + " |"] for k, s in expected.items()}
    diverged = {k: sum(bool(x["diverged"]) for x in s) for k, s in expected.items() if any(x["diverged"] for x in s)}
    assert diverged == {("| APA (paper form)", "0.0003"): 3, ("| PPO", "0.0003"): 1}   # KL above 10; stopped
    rankings = [line.strip("| ").split(" | ") for line in compare.paper_rankings(cfg).splitlines()[2:]]
    for lr, by_evaluator, by_gold, by_proxy, agree in rankings:
        means = {key: {algo: statistics.mean(s[key] for s in expected[f"| {compare.name(algo)}", lr])
                       for algo in compare.PAPER_ALGOS} for key in ("evaluator", "gold", "reward")}
        order = {key: " > ".join(compare.name(a) for a in sorted(m, key=m.get, reverse=True))
                 for key, m in means.items()}
        assert [by_evaluator, by_gold, by_proxy] == [order["evaluator"], order["gold"], order["reward"]]
        assert agree == ("yes" if order["evaluator"] == order["gold"] else "no")
    assert [(r[0], r[-1]) for r in rankings] == [("0.0001", "yes"), ("0.0003", "no")]


def test_the_paper_tables_read_the_runs_that_are_done_and_evaluated(tmp_path):
    """finished_runs keeps a run with all its iterations, or stopped, that has a held-out evaluation: not a run
    still running, nor one that never evaluated."""
    evaluated = [json.dumps(dict(ROW, iter=i, **({"eval_gold": 0.5} if i == 1 else {}))) + "\n" for i in range(1, 11)]
    never = [json.dumps(dict(ROW, iter=i)) + "\n" for i in range(1, 11)]
    write_run(tmp_path / "done", evaluated)
    write_run(tmp_path / "running", evaluated[:5])
    write_run(tmp_path / "stopped", evaluated[:5])
    (tmp_path / "stopped" / "failed.txt").write_text("3 non-finite updates in a row\n")
    write_run(tmp_path / "never", never)
    runs = compare.finished_runs([str(tmp_path / d) for d in ("done", "running", "stopped", "never")], 10)
    assert [(len(rows), stopped) for rows, stopped in runs] == [(10, False), (5, True)]


def test_the_paper_setting_runs_every_algorithm_against_the_proxy_and_tabulates_its_metrics(tmp_path):
    """--settings=paper --quick=1: the proxy and the evaluator (another seed of the annotator) trained once, then each
    algorithm at each learning rate against the proxy; every run logs the proxy, the evaluator and gold on the held-out
    prompts, and the table shows each run's own numbers (one seed: no standard error), with the figure."""
    out = tmp_path / "paper"
    text = compare.main(["--quick=1", "--settings=paper", f"--out_dir={out}", f"--sft_dir={tmp_path / 'sft'}",
                         "--workers=1"])
    assert open(out / "paper.md").read() == text
    proxy, evaluator = (json.load(open(out / "paper" / name / "metrics.json"))["config"]
                        for name in ("proxy", "evaluator"))
    assert (proxy["seed"], evaluator["seed"]) == (0, 1) and evaluator["pairs"] > proxy["pairs"]
    table = paper_rows(text.split("How the evaluator")[0].splitlines())
    assert len(table) == len(compare.PAPER_ALGOS) * 2
    for algo in compare.PAPER_ALGOS:
        for lr in (1e-3, 3e-3):
            folder = out / "paper" / f"{algo}_lr{lr:g}_seed0"
            config = json.load(open(folder / "config.json"))
            assert all(config[k] == v for k, v in compare.ALGOS[algo].items())
            assert config["reward_model"].endswith("proxy") and config["evaluator"].endswith("evaluator")
            assert config["gold_fn"] == "data:sentiment_reward" and config["lr"] == lr
            rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
            assert len(rows) == 4 and all({"reward", "evaluator", "gold"} <= r.keys() for r in rows)
            assert sum("eval_evaluator" in r for r in rows) == 3                  # iterations 1, 2 and 4
            cells = paper_cells([slow_paper_summary(rows, False)])
            assert table[f"| {compare.name(algo)}", f"{lr:g}"] == cells[:-1] + [cells[-1] + " |"]
    assert len(compare.paper_rankings(compare.CompareConfig(out_dir=str(out), quick=True, lr=1e-3)).splitlines()) == 4
    pytest.importorskip("matplotlib")
    with open(out / "paper.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_rm_table_shows_each_column_from_its_own_key(tmp_path):
    """The rm table's proxy, judge, KL, distinct-2 and judge-lost cells, each from its own key of the last exact row."""
    cfg = compare.CompareConfig(out_dir=str(tmp_path), seeds=1, rm_lams="0.1")
    run = compare.rm_run_dir(cfg, "apa", 0.1, 0)
    os.makedirs(run)
    rows = [dict(iter=i, distinct2=0.5 + 0.01 * i, **({"reward_exact": 0.1 * i, "gold_exact": 0.2 * i, "kl_exact": 0.3 * i,
                                                        "gold_lost_exact": 0.04 * i} if i % 2 else {})) for i in range(1, 6)]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = compare.rm_table(cfg, 5).splitlines()
    assert lines[2:] == [f"| APA | 0.1 | 0.500 | 1.000 | 1.50 | {statistics.mean(r['distinct2'] for r in rows):.3f} | 0.200 |"]


def test_the_rm_settings_held_out_prompts_are_held_out_openings(tmp_path):
    """The rm setting's runs train on the task's training openings and are evaluated on its held-out ones."""
    import data
    cfg = compare.CompareConfig(out_dir=str(tmp_path))
    os.makedirs(os.path.join(compare.rm_folder(cfg), "reward_model"))
    with open(os.path.join(compare.rm_folder(cfg), "reward_model", "metrics.json"), "w") as f:
        f.write("{}")                                                      # a reward model already there: none trained
    shared = compare.rm_prepare(cfg)
    train_prompts, eval_prompts = (open(shared[k]).read().splitlines() for k in ("prompts", "eval_prompts"))
    assert len(train_prompts) == len(eval_prompts) == 8
    assert set(train_prompts) <= set(data.task_prompts()) and set(eval_prompts) <= set(data.task_eval_prompts())


@pytest.mark.parametrize("flags, message", [
    (["--rm_lams=-0.1"], "rm_lams must be comma-separated KL coefficients > 0, got '-0.1' in '-0.1'"),
    (["--rm_lams=0.1,0"], "rm_lams must be comma-separated KL coefficients > 0, got '0' in '0.1,0'"),
    (["--rm_lams=abc"], "rm_lams must be comma-separated KL coefficients > 0, got 'abc' in 'abc'"),
    (["--rm_iters=0"], "rm_iters must be > 0, got 0"),
    (["--run=0"], "holds no reward model and no run: run without --run=0 first"),
])
def test_the_rm_settings_nonsense_is_one_line_before_any_work(tmp_path, flags, message):
    text = one_line_error(compare.main, ["--settings=rm", "--quick=1", "--workers=1", f"--out_dir={tmp_path / 'out'}",
                                         f"--sft_dir={tmp_path / 'sft'}", *flags])   # quick: a mutant ends soon
    assert text.startswith("error: ") and message in text, text
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "sft")


# ---------------------------------------------------------------------------------------------
# the sweep's plumbing: which runs, in which folders, how each is run, and what the plots draw


def test_each_setting_runs_its_own_algorithms():
    """As docs/experiments.md says: main, the stability map and the short responses run every algorithm but these
    three; the KL guard runs in the map only, Dr. GRPO in the short setting only, and the kl setting runs GRPO, Dr.
    GRPO and RLOO with each place for the KL that is not their own."""
    main = ["apa", "apa_paper", "apa_bounded", "ppo", "awr", "grpo", "rloo"]
    assert compare.algos("main") == main
    assert compare.algos("grid") == ["apa", "apa_paper", "apa_bounded", "apa_guard", "ppo", "awr", "grpo", "rloo"]
    assert compare.algos("short") == ["apa", "apa_paper", "apa_bounded", "ppo", "awr", "grpo", "drgrpo", "rloo"]
    assert compare.algos("kl") == ["grpo_reward", "grpo_k1", "grpo_k2", "grpo_k3_is", "drgrpo_reward", "drgrpo_k1",
                                   "drgrpo_k2", "drgrpo_k3_is", "rloo_k1", "rloo_k2", "rloo_k3", "rloo_k3_is"]


def test_each_run_has_a_folder_of_its_own_where_the_docs_say():
    """The folders that docs/experiments.md and the settings' comments name, and one folder for each run of the
    default sweep, of the rm setting and of the paper setting: no two runs share a folder (they would resume each
    other)."""
    cfg = compare.CompareConfig(out_dir="out/compare")
    assert compare.run_dir(cfg, "main", "apa", 3e-5, 0) == os.path.join("out/compare", "main", "apa_lr3e-05_seed0")
    assert compare.rm_run_dir(cfg, "awr", 0.03, 1) == os.path.join("out/compare", "rm", "awr_lam0.03_seed1")
    assert compare.paper_run_dir(cfg, "ppo", 1e-4, 2) == os.path.join("out/compare", "paper", "ppo_lr0.0001_seed2")
    lrs, seeds, _, _, _ = compare.paper_budget(cfg)
    folders = ([compare.run_dir(cfg, *key) for key in compare.plan(cfg)[0]]
               + [compare.rm_run_dir(cfg, *key) for key in compare.rm_plan(cfg)]
               + [compare.paper_run_dir(cfg, a, lr, s) for a in compare.PAPER_ALGOS for lr in lrs for s in seeds])
    # the map's 8 algorithms x 3 lrs (main's 7 among them), short's 8, kl's 12; rm's 6 x 4 lambdas; paper's 4 x 3 lrs
    assert len(folders) == (3 * 8 + 8 + 12) * 3 + 6 * 4 * 3 + 4 * 3 * 3 and len(set(folders)) == len(folders)


def test_the_rm_and_paper_settings_run_each_algorithm_at_each_lambda_or_lr_and_seed(tmp_path, monkeypatch):
    """The jobs that the rm and paper settings hand to run_jobs: each algorithm of the setting at each lambda (rm) or
    learning rate (paper) and seed, with the settings all runs share, for its own number of iterations, in its own
    folder; a run already done is not run again. --quick: one seed, 3 iterations (rm), and the quick budget (paper)."""
    jobs = []
    monkeypatch.setattr(compare, "run_jobs", lambda cfg, js: jobs.extend(js))
    cfg = compare.CompareConfig(out_dir=str(tmp_path), seeds=2, lr=2e-3, iters=300, rm_lams="0.03,0.3", rm_iters=5,
                                paper_lrs="1e-4,3e-4", paper_iters=6, paper_eval_every=3, paper_eval_samples=32)
    shared = dict(reward_model="rm", gold_fn="data:sentiment_reward", max_new_tokens=2)
    assert compare.rm_plan(cfg) == {(a, lam, s): 5 for lam in (0.03, 0.3) for s in range(2) for a in compare.RM_ALGOS}
    assert compare.rm_plan(dataclasses.replace(cfg, quick=True)) == {(a, lam, 0): 3 for lam in (0.03, 0.3)
                                                                      for a in compare.RM_ALGOS}
    write_run(compare.rm_run_dir(cfg, "ppo", 0.3, 1), rows(5))                  # done
    compare.rm_run_all(cfg, shared, compare.rm_plan(cfg))
    assert [job[:3] for job in jobs] == [(dict(shared, **compare.ALGOS[a], lam=lam, seed=s, lr=2e-3),
                                          compare.rm_run_dir(cfg, a, lam, s), 5)
                                         for lam in (0.03, 0.3) for s in range(2) for a in compare.RM_ALGOS
                                         if (a, lam, s) != ("ppo", 0.3, 1)]
    assert compare.paper_budget(cfg) == ([1e-4, 3e-4], range(2), 6, 3, 32)
    assert compare.paper_budget(dataclasses.replace(cfg, quick=True)) == ([2e-3, 6e-3], range(1), 4, 2, 16)
    jobs.clear()
    write_run(compare.paper_run_dir(cfg, "apa_authors", 1e-4, 0), rows(6))      # done
    compare.paper_run_all(cfg, shared)
    assert [job[:3] for job in jobs] == [(dict(shared, **compare.ALGOS[a], lr=lr, seed=s),
                                          compare.paper_run_dir(cfg, a, lr, s), 6)
                                         for lr in (1e-4, 3e-4) for s in range(2) for a in compare.PAPER_ALGOS
                                         if (a, lr, s) != ("apa_authors", 1e-4, 0)]


def test_a_run_trains_its_job_in_its_folder_resumes_its_checkpoint_and_a_diverged_run_is_done(tmp_path, monkeypatch,
                                                                                               capfd):
    """run_one trains train.Config with the job's overrides, its iterations and its folder, resumed where a checkpoint
    is; its printout goes to its log.txt; a run that diverges (FloatingPointError) writes failed.txt and is done."""
    import train
    seen = []

    def fake_train(cfg, known):
        seen.append(cfg)
        print(f"training seed {cfg.seed}")
        if cfg.seed == 2:
            raise FloatingPointError("3 non-finite updates in a row")
        return [dict(reward=0.5, kl=0.25)]
    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(compare, "KNOWN", {})
    folders = [str(tmp_path / name) for name in ("fresh", "resumed", "diverged")]
    os.makedirs(folders[1])
    open(os.path.join(folders[1], "ckpt.pt"), "w").close()                     # a checkpoint: the run resumes
    for seed, folder in enumerate(folders):
        compare.run_one((dict(algo="ppo", lr=1e-3, seed=seed), folder, 7, f"run {seed}"))
    assert [(c.algo, c.lr, c.seed, c.iters, c.out_dir, c.resume, c.sample_every) for c in seen] == \
        [("ppo", 1e-3, seed, 7, folder, seed == 1, 0) for seed, folder in enumerate(folders)]
    assert [open(os.path.join(f, "log.txt")).read() for f in folders] == [f"training seed {s}\n" for s in range(3)]
    assert open(os.path.join(folders[2], "failed.txt")).read() == "3 non-finite updates in a row\n"
    assert compare.is_done(folders[2], 7) and not compare.is_done(folders[0], 7)
    out = capfd.readouterr().out                                                # the console's lines
    assert "run 0: done in" in out and "reward 0.500, kl 0.250 at the end" in out
    assert "run 2: stopped: 3 non-finite updates in a row" in out


def test_run_jobs_pre_trains_the_jobs_pi_init_once_then_runs_each_job(monkeypatch):
    """pi_init is pre-trained (or read from its cache) once, with the first job's settings, before any run; with
    nothing to run, nothing is pre-trained."""
    import train
    from lab import runs
    calls = []
    monkeypatch.setattr(runs, "cached_pretrain", lambda cfg, enc, device: calls.append(("pi_init", cfg)))
    monkeypatch.setattr(compare, "run_one", lambda job: calls.append(("run", job)))
    monkeypatch.setattr(compare, "init_worker", lambda pool=False: None)       # it would set this process's threads
    cfg = compare.CompareConfig(out_dir="unused", workers=1)
    compare.run_jobs(cfg, [])
    assert calls == []
    jobs = [(dict(compare.QUICK, lr=1e-3, seed=s), f"run{s}", 3, f"tag {s}") for s in range(2)]
    compare.run_jobs(cfg, jobs)
    assert calls == [("pi_init", dataclasses.replace(train.Config(), **jobs[0][0]))] + [("run", job) for job in jobs]


def test_a_worker_of_the_pool_leaves_ctrl_c_to_the_sweep_and_runs_one_thread():
    """In a pool, Ctrl-C is the main process's to handle (it ends the pool, with no traceback from each worker); a run
    in the main process keeps Ctrl-C. Each runs one thread, as the runs share the cores."""
    import signal
    import torch
    before, threads = signal.getsignal(signal.SIGINT), torch.get_num_threads()
    try:
        compare.init_worker()
        assert signal.getsignal(signal.SIGINT) is before and torch.get_num_threads() == 1
        compare.init_worker(pool=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        torch.set_num_threads(threads)


def test_a_run_loads_the_same_from_its_folder_and_from_its_metrics_file(tmp_path):
    """--plot takes a run's folder or its metrics.jsonl: the same rows and the same settings, read from the
    config.json beside it, with the iterations it ran (not those it was asked for)."""
    config = json.dumps(dict(algo="ppo", lr=1e-3, max_new_tokens=2, lam=0.3, seed=4, iters=300))
    path = write_run(tmp_path / "run", rows(5), config)
    settings, got = compare.load_run(path)
    assert (settings, got) == compare.load_run(str(tmp_path / "run"))
    assert settings == {"algorithm": "PPO", "lr": 1e-3, "iters": 5, "max_new_tokens": 2, "lam": 0.3, "seed": 4}
    assert got == [json.loads(line) for line in rows(5)]


@pytest.fixture
def figures(monkeypatch):
    """The figures that compare.py draws, kept open for the test to read: its plots close each after saving it."""
    pytest.importorskip("matplotlib")
    plt, kept = compare.pyplot(), []

    class Keep:
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            kept.append(fig)
    monkeypatch.setattr(compare, "pyplot", Keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def test_the_curves_draw_each_setting_once_the_mean_over_its_seeds_with_a_min_to_max_band(tmp_path, figures):
    """plot_curves: runs that differ only in their seed are one line, the mean of their 10-iteration moving means,
    with a band from the smallest to the largest; the legend names what differs (here the algorithm)."""
    runs, written = [], {}
    for algo, seed in (("apa", 0), ("apa", 1), ("ppo", 3)):
        written[algo, seed] = synthetic_run(30, seed)
        config = json.dumps(dict(algo=algo, lr=1e-3, max_new_tokens=8, lam=0.1, seed=seed, target_kl=0.0))
        runs.append(compare.load_run(write_run(tmp_path / f"{algo}{seed}", [json.dumps(r) + "\n" for r in
                                                                            written[algo, seed]], config)))
    compare.plot_curves(runs, str(tmp_path / "curves.png"))
    (fig,) = figures
    ax = fig.axes[0]                                                  # the reward
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["APA (2 seeds)", "PPO"]
    means = {seed: [statistics.mean(r["reward"] for r in written["apa", seed][i - 10:i]) for i in range(10, 31)]
             for seed in (0, 1)}
    assert list(lines["APA (2 seeds)"].get_xdata()) == [16 * i for i in range(10, 31)]
    assert lines["APA (2 seeds)"].get_ydata() == pytest.approx([(a + b) / 2 for a, b in zip(means[0], means[1])])
    (band,) = ax.collections                                          # one band: APA's two seeds
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(means[0])) and max(ys) == pytest.approx(max(means[1]))


def test_the_stability_map_shows_the_mean_final_gap_over_seeds_with_min_to_max_bars(tmp_path, figures):
    """plot_stability: at each learning rate, the mean over seeds of each run's final gap (the summary's), with a bar
    from the smallest to the largest."""
    cfg = compare.CompareConfig(out_dir=str(tmp_path))
    gaps = {}
    for lr in (1e-3, 3e-3):
        for seed in range(3):
            written = synthetic_run(30, seed + 1000 * lr)
            write_run(tmp_path / "main" / f"apa_lr{lr:g}_seed{seed}", [json.dumps(r) + "\n" for r in written])
            gaps.setdefault(lr, []).append(statistics.mean(r["gap"] for r in written[-20:]))
    compare.plot_stability(cfg, [3e-3, 1e-3], 30, range(3), str(tmp_path / "map.png"))
    (fig,) = figures
    (bars,) = fig.axes[0].containers                                   # APA's: the only algorithm run
    line, _, (segments,) = bars.lines
    assert bars.get_label() == "APA"
    assert line.get_ydata() == pytest.approx([statistics.mean(gaps[lr]) for lr in (1e-3, 3e-3)])
    assert [sorted(seg[:, 1]) for seg in segments.get_segments()] == \
        [pytest.approx([min(gaps[lr]), max(gaps[lr])]) for lr in (1e-3, 3e-3)]


def test_the_rm_setting_from_runs_done_draws_each_path_and_the_frontier_in_the_order_of_the_kl(tmp_path, figures,
                                                                                             monkeypatch):
    """--settings=rm --run=0: the text names the reward model's own figures, no run is started, and the figure draws
    each run's exact evaluations (judge and proxy against the KL) and the frontier through every (KL, frontier) point
    the runs logged, in the order of the KL."""
    monkeypatch.setattr(compare, "run_jobs", lambda cfg, jobs: pytest.fail("--run=0 ran something"))
    cfg = compare.CompareConfig(out_dir=str(tmp_path), seeds=1, rm_lams="0.1,0.3", rm_iters=6, run=False)
    os.makedirs(os.path.join(compare.rm_folder(cfg), "reward_model"))
    with open(os.path.join(compare.rm_folder(cfg), "reward_model", "metrics.json"), "w") as f:
        json.dump(dict(pairs=500, accuracy=0.7, accuracy_true=0.8, spearman=0.9), f)
    paths = {}
    for j, (algo, lam) in enumerate((("apa", 0.1), ("ppo", 0.1), ("apa", 0.3))):
        written = [dict(r, **({"kl_exact": 0.1 * i + 0.03 * j, "gold_exact": 0.5 - 0.01 * i * j, "reward_exact": 0.2 * i,
                               "gold_frontier_exact": 0.6 + 0.02 * i + 0.001 * j, "gold_lost_exact": 0.1}
                              if i % 2 else {})) for i, r in enumerate(synthetic_run(6, 0), 1)]  # exact at odd i
        write_run(compare.rm_run_dir(cfg, algo, lam, 0), [json.dumps(r) + "\n" for r in written])
        paths[algo, lam] = [r for r in written if "gold_exact" in r]
    text, png = compare.rm_sweep(cfg)
    assert ("The reward model: 500 held-out pairs, accuracy 0.700 against the annotator's labels and 0.800 against "
            "the true reward's order, Spearman 0.900.") in text
    assert compare.rm_table(cfg, 6) in text and png == os.path.join(str(tmp_path), "rm.png")
    (fig,) = figures
    judge, proxy = fig.axes
    frontier = [line for line in judge.get_lines() if line.get_label().startswith("frontier")][0]
    points = sorted((r["kl_exact"], r["gold_frontier_exact"]) for rows_ in paths.values() for r in rows_)
    assert list(zip(frontier.get_xdata(), frontier.get_ydata())) == points
    for ax, key in ((judge, "gold_exact"), (proxy, "reward_exact")):
        drawn = [list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines() if line is not frontier]
        assert drawn == [[(r["kl_exact"], r[key]) for r in paths[run]] for run in   # in RM_ALGOS' order
                         (("apa", 0.1), ("apa", 0.3), ("ppo", 0.1))]


def test_the_paper_setting_from_runs_done_names_each_reward_model_and_draws_the_held_out_scores(tmp_path, figures,
                                                                                              monkeypatch):
    """--settings=paper --run=0: the text names the proxy's and the evaluator's own accuracy, no run is started, and
    the figure draws, per learning rate and algorithm, the mean over seeds of the held-out gold score (top) and the
    evaluator's (bottom) against the mean held-out KL."""
    monkeypatch.setattr(compare, "run_jobs", lambda cfg, jobs: pytest.fail("--run=0 ran something"))
    cfg = compare.CompareConfig(out_dir=str(tmp_path), seeds=2, paper_lrs="1e-4", paper_iters=6, paper_eval_every=2,
                                run=False)
    for folder, accuracy, pairs in (("proxy", 0.7, 500), ("evaluator", 0.8, 1000)):
        os.makedirs(os.path.join(compare.paper_folder(cfg), folder))
        with open(os.path.join(compare.paper_folder(cfg), folder, "metrics.json"), "w") as f:
            json.dump(dict(pairs=pairs, accuracy=accuracy), f)
    written = {}
    for a, algo in enumerate(("apa", "ppo")):
        for seed in range(2):
            held_out = dict(eval_gold=lambda i, s: 0.1 * i + s + a, eval_evaluator=lambda i, s: 0.2 * i - s - a,
                            eval_reward=lambda i, s: 0.3, eval_kl=lambda i, s: 0.05 * i * (1 + s + a))
            written[algo, seed] = [dict(r, **({k: f(r["iter"], seed) for k, f in held_out.items()}
                                              if r["iter"] % 2 == 0 else {})) for r in synthetic_run(6, seed)]
            write_run(compare.paper_run_dir(cfg, algo, 1e-4, seed), [json.dumps(r) + "\n" for r in written[algo, seed]])
    text, png = compare.paper_sweep(cfg)
    assert "The proxy: accuracy 0.700 on 500 held-out pairs. The evaluator: accuracy 0.800 on 1000 held-out pairs." \
        in text
    assert compare.paper_table(cfg) in text and png == os.path.join(str(tmp_path), "paper.png")
    (fig,) = figures
    for ax, key in zip(fig.axes, ("eval_gold", "eval_evaluator")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["APA", "PPO"]
        for algo in ("apa", "ppo"):
            evals = [[r for r in written[algo, s] if key in r] for s in range(2)]
            assert list(lines[compare.name(algo)].get_xdata()) == pytest.approx(
                [statistics.mean(e[i]["eval_kl"] for e in evals) for i in range(3)])
            assert list(lines[compare.name(algo)].get_ydata()) == pytest.approx(
                [statistics.mean(e[i][key] for e in evals) for i in range(3)])


def test_the_sweep_tabulates_and_draws_each_setting_at_its_own_length(tmp_path, figures):
    """compare --run=0 on runs done: the main table summarises each main run over its iters iterations, the stability
    map over grid_iters of the same runs (the runs run the longer of the two), and the curves of the main runs and
    the map are drawn."""
    cfg = compare.CompareConfig(out_dir=str(tmp_path), settings="main,grid", seeds=2, lr=1e-3, lrs="1e-3", iters=40,
                                grid_iters=30, run=False)
    written = {}
    for (setting, algo, lr, seed), iters in compare.plan(cfg)[0].items():
        written[algo, seed] = synthetic_run(iters, seed + 0.13 * len(written))
        config = json.dumps(dict(dict(lr=lr, max_new_tokens=8, lam=0.1, seed=seed, target_kl=0.0), **compare.ALGOS[algo]))
        write_run(compare.run_dir(cfg, setting, algo, lr, seed), [json.dumps(r) + "\n" for r in written[algo, seed]],
                  config)

    def cell(runs, key, fmt):
        values = [slow_summary(r, "gap")[key] for r in runs]
        return f"{statistics.mean(values):{fmt}} +- {statistics.stdev(values):{fmt}}"
    text = compare.compare(cfg)
    main, grid = text.split("## Stability map")
    apa = [written["apa", s] for s in range(2)]
    assert f"| APA | {cell(apa, 'reward', '.3f')} | {cell(apa, 'kl', '.2f')} | {cell(apa, 'gap', '.3f')} |" in main
    assert f"| APA | {cell([r[:30] for r in apa], 'gap', '.3f')} (KL max " in grid
    assert len(figures) == 2 and os.path.exists(tmp_path / "compare.png") and os.path.exists(tmp_path / "stability.png")
    curves = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert sorted(curves) == sorted(f"{compare.name(a)} (2 seeds)" for a in compare.algos("main"))
    assert len(curves["APA (2 seeds)"].get_xdata()) == 40 - 9
