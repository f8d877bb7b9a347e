"""
Tests of compare.py: the quick sweep end to end (every algorithm, setting and output), its cache,
and --plot on a run directory, with and without matplotlib. Run: pytest -q tests/test_compare.py
"""
import os
import sys

import pytest

import compare


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    text = compare.main(["--quick=1", f"--out_dir={out}", f"--sft_dir={out / 'sft'}", "--workers=1"])
    return out, text


def test_quick_sweep_writes_table_and_plots(quick):
    out, text = quick
    for name in compare.NAMES.values():
        assert text.count(f"| {name} |") == 3                       # main table, stability map, short responses
    assert "nan" not in text
    assert open(out / "compare.md").read() == text
    pytest.importorskip("matplotlib")                               # an optional extra: the plots need it
    for png in ("compare.png", "stability.png", "compare_short.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finished_runs_are_not_run_again(quick, capsys):
    out, text = quick
    before = {p: os.path.getmtime(p) for p in out.glob("*/*/metrics.jsonl")}
    assert len(before) == 12                                        # 4 algorithms x (2 lrs + short)
    again = compare.main(["--quick=1", f"--out_dir={out}", f"--sft_dir={out / 'sft'}", "--workers=1"])
    assert "12 runs, 12 already done, 0 to run" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in before} == before
    assert again.split("\n", 4)[4:] == text.split("\n", 4)[4:]      # the same table (the header has the time)


def test_plot_of_a_run_directory(quick, capsys):
    pytest.importorskip("matplotlib")
    out, _ = quick
    run = out / "main" / "awr_lr0.001_seed0"
    assert compare.main([f"--plot={run / 'metrics.jsonl'},{out / 'main' / 'ppo_lr0.001_seed0'}"]) == str(run / "metrics.png")
    with open(run / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(quick, capsys, monkeypatch):
    out, _ = quick
    run = out / "main" / "ppo_lr0.001_seed0"
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib raises ImportError
    assert compare.main([f"--plot={run}"]) is None
    assert capsys.readouterr().out == "matplotlib is not installed: no plot (pip install matplotlib)\n"
    assert not os.path.exists(run / "metrics.png")


def test_jstar_is_estimated_once_per_pi_init_data_and_lambda(monkeypatch):
    import dataclasses
    import train
    monkeypatch.setattr(compare, "_jstar", {})
    calls = []
    cached = compare.cached_jstar(lambda cfg, *args: calls.append(cfg) or (len(calls), 0.0))
    base = train.Config()
    for algo, lr, seed in (("apa", 3e-5, 0), ("ppo", 1e-4, 1), ("awr", 3e-4, 2)):  # RL settings: one estimate
        assert cached(dataclasses.replace(base, algo=algo, lr=lr, seed=seed, out_dir=f"out/{algo}")) == (1, 0.0)
    for change in (dict(lam=0.2), dict(max_new_tokens=2), dict(n_head=2), dict(sft_lr=3e-3), dict(prompts="p.txt")):
        cached(dataclasses.replace(base, **change))                  # pi_init, data or lambda: a new estimate
    assert len(calls) == 6
