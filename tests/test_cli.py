"""
The command line: argparse built from train.Config, every form a user types. Run: pytest -q tests/test_cli.py
"""
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

import train
from lab import cli

ROOT = train.__file__.rsplit("/", 1)[0]


def one_line_error(main, argv):
    """The one line `error: ...` that a script's main(argv) ends with (train.py, experiments/compare.py, experiments/bench.py)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = e.value.code
    assert isinstance(text, str) and text.startswith("error: ") and "\n" not in text, text
    return text


def test_space_and_equals_forms_give_the_same_config():
    a = cli.parse_args(train.Config, ["--algo", "ppo", "--iters", "60", "--lr", "1e-4", "--prompts", "p.txt"])
    b = cli.parse_args(train.Config, ["--algo=ppo", "--iters=60", "--lr=1e-4", "--prompts=p.txt"])
    assert a == b and (a.algo, a.iters, a.lr, a.prompts) == ("ppo", 60, 1e-4, "p.txt")
    assert type(a.iters) is int and type(a.lr) is float


def test_no_flags_give_the_defaults():
    assert cli.parse_args(train.Config, []) == train.Config()


@pytest.mark.parametrize("argv, value", [(["--resume"], True), (["--resume=true"], True), (["--resume", "1"], True),
                                         (["--resume=TRUE"], True), (["--resume=false"], False), (["--resume", "0"], False),
                                         ([], False), (["--resume", "--iters=5"], True)])
def test_booleans_as_bare_flags_and_true_false_1_0(argv, value):
    assert cli.parse_args(train.Config, argv).resume is value


@pytest.mark.parametrize("spelling", ["on", "yes", "maybe", "2", ""])
def test_other_boolean_spellings_are_refused(spelling):
    with pytest.raises(ValueError, match=f"--resume: expected true, false, 1 or 0, got '{spelling}'"):
        cli.parse_args(train.Config, [f"--resume={spelling}"])


def test_choices_are_refused_with_the_list():
    with pytest.raises(ValueError, match=r"--algo: invalid choice: 'dpo' \(choose from 'apa', 'ppo'"):
        cli.parse_args(train.Config, ["--algo", "dpo"])
    with pytest.raises(ValueError, match="--apa_form: invalid choice"):
        cli.parse_args(train.Config, ["--apa_form=literal"])


@pytest.mark.parametrize("flag, suggestion", [("--iter=3", "--iters"), ("--sft-steps=5", "--sft_steps"),
                                              ("--batchsize=8", "--batch_size"), ("--seeds", "--seed")])
def test_a_typo_suggests_the_close_match(flag, suggestion):
    with pytest.raises(ValueError, match=f"did you mean {suggestion}\\?"):
        cli.parse_args(train.Config, [flag])


def test_no_abbreviations_and_no_stray_words():
    with pytest.raises(ValueError, match="unknown argument '--max_new'"):
        cli.parse_args(train.Config, ["--max_new", "3"])      # argparse would expand a unique prefix
    with pytest.raises(ValueError, match="unknown argument 'ppo'"):
        cli.parse_args(train.Config, ["ppo"])
    with pytest.raises(ValueError, match="invalid int value: '1.5'"):
        cli.parse_args(train.Config, ["--iters=1.5"])


def test_every_field_has_help_and_the_help_is_grouped():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""
    groups = [line for line in out.stdout.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups[-5:] == ["algorithm:", "optimisation:", "data and models:", "output:", "sampling from a trained policy:"]
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}" in out.stdout
    assert "paper: pi_init anchor, no KL in the reward" in out.stdout      # a comment continued on the next line


def test_a_bad_flag_is_one_line_on_stderr_with_exit_status_1():
    out = subprocess.run([sys.executable, "train.py", "--iters", "x"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: argument --iters: invalid int value: 'x'\n"


def test_one_line_joins_every_line_break_and_space_and_cuts_at_the_limit():
    """Another library's message (here with Windows line ends, a tab, an empty line and an indented line) becomes one
    line whose words are separated by single spaces, then cut to the limit."""
    message = OSError("cannot read\r\n  config.json:\tline 3\n\n    expected '}'")
    assert cli.one_line(message) == "cannot read config.json: line 3 expected '}'"
    assert cli.one_line(message, 25) == "cannot read config.json: "


def test_any_dataclass_gets_the_same_parser():
    @dataclass
    class Small:
        # --- run
        mode: Literal["fast", "slow"] = "fast"  # how to run
        n: int = 3                     # how many
        plot: bool = False             # draw it
    assert cli.parse_args(Small, ["--mode", "slow", "--plot", "--n=5"]) == Small("slow", 5, True)
    with pytest.raises(ValueError, match="did you mean --mode"):
        cli.parse_args(Small, ["--mod=fast"])


def test_a_float_or_none_flag_takes_a_float_and_defaults_to_none():
    assert cli.parse_args(train.Config, []).lr is None                       # resolved from --init: train.resolve
    assert cli.parse_args(train.Config, ["--lr=1e-4"]).lr == 1e-4
    with pytest.raises(ValueError, match="--lr: invalid float value: 'fast'"):
        cli.parse_args(train.Config, ["--lr=fast"])
    assert train.resolve(train.Config()).lr == 3e-5 and train.resolve(train.Config(init="some/model")).lr == 1e-6
    assert train.resolve(train.Config(init="some/model", lr=1e-4)).lr == 1e-4
