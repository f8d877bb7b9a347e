"""
Tests of experiments/bench.py: its flags are checked and every failure is one line `error: ...`; one very small
measurement of the tiny model (a few seconds). Run: pytest -q tests/test_bench.py
"""
import pytest
import torch

from experiments import bench
from test_cli import one_line_error

SMALL = ["--models=tiny", "--batch_size=2", "--prompt_len=4", "--max_new_tokens=2", "--rounds=1", "--iters=1"]


def error_of(argv):
    """The one-line message that bench.main ends with."""
    return one_line_error(bench.main, argv)


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "batch_size must be > 0, got 0"),
    ("--prompt_len=1", "prompt_len must be >= 2"),
    ("--max_new_tokens=0", "max_new_tokens must be > 0, got 0"),
    ("--rounds=-1", "rounds must be >= 0"),
    ("--iters=0", "iters must be > 0"),
    ("--epochs=0", "epochs must be > 0, got 0"),
    ("--seed=-1", "seed must be >= 0, got -1"),
    ("--prompt_len=100", "prompt_len + max_new_tokens must be <= 64 (the tiny model's context), got 100 + 2"),
    ("--models=gpt3", "--models: invalid choice: 'gpt3'"),
])
def test_a_bad_flag_is_one_line(flag, message):
    assert message in error_of(SMALL + [flag])          # the small run's flags, then the bad one (the last wins)


def test_reward_model_without_rounds_is_refused_before_pre_training(tmp_path):
    text = error_of(["--reward_model=1", "--rounds=0", f"--sft_dir={tmp_path / 'sft'}"])
    assert text == "error: rounds must be >= 1 with --reward_model (its ratio is a median over the rounds), got 0"
    assert not (tmp_path / "sft").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_line():
    assert error_of(SMALL + ["--device=cuda"]) == ("error: --device=cuda, but torch finds no CUDA GPU on this machine "
                                                   "(use --device=cpu or auto)")


def test_a_small_measurement_prints_the_table(capsys):
    lines = bench.main(SMALL + ["--device=cpu"])
    assert lines[2].startswith("| tiny | 0.44M | ") and lines[2].count("|") == 14
    static, eager, theirs, static_ratio, eager_ratio = (float(c.strip(" x").replace(",", "")) for c in lines[2].split("|")[3:8])
    assert static / theirs == pytest.approx(static_ratio, rel=0.02, abs=0.006)   # one round: the ratio of the rates
    assert eager / theirs == pytest.approx(eager_ratio, rel=0.02, abs=0.006)
    assert capsys.readouterr().out.endswith("\n".join(lines) + "\n")
