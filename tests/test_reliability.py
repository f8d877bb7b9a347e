"""
Reliability of train.py: nonsense refused before anything runs, every failure one line, Ctrl-C that says
how to resume, checkpoints and metrics that cannot disagree, one run per out_dir, caches and checkpoints
that a full disk cannot damage. Run: pytest -q tests/test_reliability.py
"""
import errno
import os
import shutil
import signal

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import common
import data
import model
import train
from test_train import read_metrics, run_script, tiny_args, write


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "sft"                   # the same pi_init cache as test_train.py's
    path.mkdir(exist_ok=True)
    return str(path)


def fails(args, message):
    """train.main(args) stops with one line `error: ...` that contains message."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
    return text


# ----------------------------------------------------------------------------------------------
# nonsense is refused with the reason, before pre-training and before anything is written

def causal_lm(tmp):
    enc = data.task_encoding()
    GPT2LMHeadModel(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp / "lm")
    return str(tmp / "lm")


NONSENSE = {  # name: (flags, given the test's tmp_path; what the error says)
    "iters 0": (lambda tmp: dict(iters=0), "iters must be > 0, got 0"),
    "iters -1": (lambda tmp: dict(iters=-1), "iters must be > 0"),
    "epochs 0": (lambda tmp: dict(epochs=0), "epochs must be > 0"),
    "gamma 2": (lambda tmp: dict(gamma=2), "gamma must be in [0, 1]"),
    "gae_lambda -1": (lambda tmp: dict(gae_lambda=-1), "gae_lambda must be in [0, 1]"),
    "cliprange 0": (lambda tmp: dict(cliprange=0), "cliprange must be > 0"),
    "cliprange -1": (lambda tmp: dict(cliprange=-1), "cliprange must be > 0"),
    "cliprange_value 0": (lambda tmp: dict(cliprange_value=0), "cliprange_value must be > 0"),
    "max_grad_norm -1": (lambda tmp: dict(max_grad_norm=-1), "max_grad_norm must be > 0"),
    "vf_coef -1": (lambda tmp: dict(vf_coef=-1), "vf_coef must be >= 0"),
    "sft_steps 0": (lambda tmp: dict(sft_steps=0), "sft_steps must be > 0"),
    "ckpt_every -1": (lambda tmp: dict(ckpt_every=-1), "ckpt_every must be >= 0"),
    "sample_every -1": (lambda tmp: dict(sample_every=-1), "sample_every must be >= 0"),
    "max_bad_steps 0": (lambda tmp: dict(max_bad_steps=0), "max_bad_steps must be > 0"),
    "batch_size -4": (lambda tmp: dict(batch_size=-4), "batch_size must be > 0"),
    "minibatch_size 0": (lambda tmp: dict(minibatch_size=0), "minibatch_size must be > 0"),
    "max_new_tokens 0": (lambda tmp: dict(max_new_tokens=0), "max_new_tokens must be > 0"),
    "jstar_samples 1": (lambda tmp: dict(jstar_samples=1), "jstar_samples must be 0 (no J*) or >= 2"),
    "jstar_samples -5": (lambda tmp: dict(jstar_samples=-5), "jstar_samples must be 0"),
    "lr inf": (lambda tmp: dict(lr="inf"), "lr must be a finite number, got inf"),
    "lr nan": (lambda tmp: dict(lr="nan"), "lr must be a finite number"),
    "lr 1e6": (lambda tmp: dict(lr=1e6), "lr must be in [0, 0.1]"),
    "lr -1": (lambda tmp: dict(lr=-1), "lr must be in [0, 0.1]"),
    "lam inf": (lambda tmp: dict(lam="inf"), "lam must be a finite number"),
    "seed -1": (lambda tmp: dict(seed=-1), "seed must be >= 0"),
    "n_embd % n_head": (lambda tmp: dict(n_embd=30, n_head=4), "divisible by n_head=4"),
    "resume maybe": (lambda tmp: dict(resume="maybe"), "expected true, false, 1 or 0"),
    "device mps": (lambda tmp: dict(device="mps"), "invalid choice"),
    "device bogus": (lambda tmp: dict(device="tpu9"), "invalid choice"),
    ".json prompts": (lambda tmp: dict(prompts=write(tmp / "p.json", '[{"prompt": "the movie was"}]')),
                      "give a .jsonl file"),
    "JSONL number": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", '{"prompt": "a"}\n5\n')), 'p.jsonl:2: expected'),
    "JSONL null": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", "null\n")), '"prompt" string'),
    "JSONL list": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", '["the movie was"]\n')), '"prompt" string'),
    "JSONL prompt not text": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", '{"prompt": 5}\n')), '"prompt" string'),
    "reward_fn not callable": (lambda tmp: dict(reward_fn="data:POSITIVE"), "is a list, not a function"),
    "reward_fn no module": (lambda tmp: dict(reward_fn=":f"), "not found"),
    "reward_model a causal LM": (lambda tmp: dict(reward_model=causal_lm(tmp)), "not a sequence-classification model"),
}
if not torch.cuda.is_available():
    NONSENSE["device cuda without CUDA"] = (lambda tmp: dict(device="cuda"), "finds no CUDA GPU")


@pytest.mark.parametrize("case", NONSENSE)
def test_nonsense_is_refused_before_pre_training(case, tmp_path):
    make_args, message = NONSENSE[case]
    out, sft = tmp_path / "out", tmp_path / "sft"                   # sft: pre-training would create it
    out.mkdir()
    write(out / "metrics.jsonl", '{"iter": 1}\n')
    fails(tiny_args(str(sft), out, **make_args(tmp_path)), message)
    assert not sft.exists() and os.listdir(out) == ["metrics.jsonl"] and read_metrics(out) == [{"iter": 1}]


# ----------------------------------------------------------------------------------------------
# a reward function that fails is named in one line; APA_DEBUG=1 shows the traceback

def raising_reward(prompts, completions):
    return 1 / 0


def none_reward(prompts, completions):
    return None


def dict_reward(prompts, completions):
    return {"score": 1.0}


def generator_reward(prompts, completions):
    return (0.0 for _ in completions)


def text_reward(prompts, completions):
    return ["good"] * len(completions)


REWARD_FAILURES = {
    "raises": ("raising_reward", "reward function test_reliability:raising_reward raised ZeroDivisionError: "
                                 "division by zero"),
    "returns None": ("none_reward", "returned a NoneType: expected a list of 16 floats"),
    "returns a dict": ("dict_reward", "returned a dict"),
    "returns a generator": ("generator_reward", "returned a generator"),
    "returns text": ("text_reward", "expected a list of 16 floats"),
}


@pytest.mark.parametrize("case", REWARD_FAILURES)
def test_a_failing_reward_function_is_named_in_one_line(case, sft_dir, tmp_path):
    name, message = REWARD_FAILURES[case]
    fails(tiny_args(sft_dir, tmp_path, reward_fn=f"test_reliability:{name}"), message)


def test_apa_debug_shows_the_traceback(sft_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("APA_DEBUG", "1")
    with pytest.raises(ValueError, match="raised ZeroDivisionError") as e:
        train.main(tiny_args(sft_dir, tmp_path, reward_fn="test_reliability:raising_reward"))
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_an_unexpected_exception_is_one_line_with_its_type(sft_dir, tmp_path, monkeypatch):
    def update(*args):
        raise RuntimeError("something\nbroke")
    monkeypatch.setattr(train, "update", update)
    fails(tiny_args(sft_dir, tmp_path), "RuntimeError: something broke (APA_DEBUG=1 shows the traceback)")


# ----------------------------------------------------------------------------------------------
# Ctrl-C: exit status 130, a message that says how to resume, the last checkpoint intact

def test_ctrl_c_during_training_exits_130_and_resume_continues(sft_dir, tmp_path):
    train.main(tiny_args(sft_dir, tmp_path / "warm", iters=1))      # pi_init cached before the subprocess
    proc = run_script(tiny_args(sft_dir, tmp_path, iters=1000, ckpt_every=2))
    for line in proc.stdout:
        if line.startswith("iter 3/"):                              # between checkpoints 2 and 4
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: {tmp_path / 'ckpt.pt'} is intact; the same command with "
                                            "--resume=1 continues from it")
    last = torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter"]
    assert last >= 2 and len(read_metrics(tmp_path)) >= last
    train.main(tiny_args(sft_dir, tmp_path, iters=last + 2, ckpt_every=2, resume=True))  # may stop earlier
    assert [r["iter"] for r in read_metrics(tmp_path)] == list(range(1, last + 3))


def test_ctrl_c_during_pre_training_leaves_no_cache(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(model, "status", interrupt)                 # called after each pre-training step
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(str(tmp_path / "sft"), tmp_path / "out"))
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().endswith("interrupted: no checkpoint yet, nothing to resume")
    assert not (tmp_path / "sft").exists() or os.listdir(tmp_path / "sft") == []


# ----------------------------------------------------------------------------------------------
# --resume: the checkpoint, the config and metrics.jsonl must agree

@pytest.fixture(scope="module")
def finished_run(sft_dir, tmp_path_factory):
    """A 4-iteration run with checkpoints at 2 and 4, to copy and damage."""
    out = tmp_path_factory.mktemp("finished")
    train.main(tiny_args(sft_dir, out, iters=4, ckpt_every=2))
    return out


def edit_checkpoint(change):
    def edit(out):
        state = torch.load(out / "ckpt.pt", weights_only=False)
        change(state)
        torch.save(state, out / "ckpt.pt")
    return edit


def edit_metrics(change):
    def edit(out):
        lines = open(out / "metrics.jsonl").read().splitlines()
        write(out / "metrics.jsonl", "".join(line + "\n" for line in change(lines)))
    return edit


def truncate(out):
    size = os.path.getsize(out / "ckpt.pt")
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(size // 2)


RESUME_REFUSED = {  # name: (damage done to the finished run, flags of the resumed run, what the error says)
    "another algorithm": (None, dict(algo="ppo"), "--resume would mix two runs: algo 'apa' -> 'ppo'"),
    "another batch size": (None, dict(batch_size=8), "batch_size 16 -> 8"),
    "another reward": (None, dict(reward_fn="test_reliability:none_reward"), "reward_fn 'data:sentiment_reward' ->"),
    "iters below the checkpoint": (None, dict(iters=3), "ckpt.pt is at iteration 4, past --iters=3"),
    "truncated ckpt.pt": (truncate, {}, "ckpt.pt is damaged"),
    "empty ckpt.pt": (lambda out: write(out / "ckpt.pt", ""), {}, "ckpt.pt is damaged"),
    "garbage ckpt.pt": (lambda out: write(out / "ckpt.pt", b"\x00garbage" * 100, "wb"), {}, "ckpt.pt is damaged"),
    "ckpt.pt without config": (edit_checkpoint(lambda s: s.pop("config")), {}, "(KeyError: 'config')"),
    "ckpt.pt of another model shape": (edit_checkpoint(lambda s: s["policy"].update({"v_head.weight": torch.zeros(1, 64)})),
                                       {}, "does not fit this model: size mismatch for v_head.weight"),
    "ckpt.pt of another model config": (edit_checkpoint(lambda s: s["config"].update(n_layer=2)), {}, "n_layer 2 -> 1"),
    "metrics.jsonl missing": (lambda out: os.remove(out / "metrics.jsonl"), {}, "it has 0 lines"),
    "metrics.jsonl short": (edit_metrics(lambda lines: lines[:3]), {}, "it has 3 lines"),
    "metrics.jsonl garbage line": (edit_metrics(lambda lines: [lines[0], "{oops", *lines[2:]]), {}, "line 2 is not"),
    "metrics.jsonl hole": (edit_metrics(lambda lines: [lines[0], *lines[2:], lines[3]]), {}, "line 2 is not"),
    "metrics.jsonl of another run": (edit_metrics(lambda lines: lines[:3] + [lines[3][:-1] + ', "x": 1}']),
                                     {}, "line 4 differs"),
}


@pytest.mark.parametrize("case", RESUME_REFUSED)
def test_resume_refuses_what_would_corrupt_the_run(case, finished_run, sft_dir, tmp_path):
    damage, flags, message = RESUME_REFUSED[case]
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    if damage:
        damage(out)
    before = {name: open(out / name, "rb").read() for name in ("ckpt.pt", "metrics.jsonl") if (out / name).exists()}
    fails(tiny_args(sft_dir, out, **{"iters": 4, "ckpt_every": 2, "resume": True, **flags}), message)
    assert {name: open(out / name, "rb").read() for name in before} == before  # nothing touched


def test_resume_drops_lines_after_the_checkpoint_and_may_change_the_lr(finished_run, sft_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    with open(out / "metrics.jsonl", "a") as f:                     # a run killed after iteration 6, mid-line
        f.write('{"iter": 5}\n{"iter": 6}\n{"iter": 7, "rew')
    history = train.main(tiny_args(sft_dir, out, iters=5, ckpt_every=2, resume=True, lr=5e-4))
    assert "lr changed from 0.001 to 0.0005" in capsys.readouterr().out
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3, 4, 5] and len(history) == 1
    assert read_metrics(out)[:4] == read_metrics(finished_run)
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["opt"]["param_groups"][0]["lr"] == 5e-4 and state["config"]["lr"] == 5e-4 and state["iter"] == 5


# ----------------------------------------------------------------------------------------------
# one run at a time in an out_dir

def test_a_second_run_in_the_same_out_dir_is_refused(sft_dir, tmp_path):
    with common.exclusive(str(tmp_path)):                            # as a run in another process would hold it
        fails(tiny_args(sft_dir, tmp_path, iters=1), f"another run is using {tmp_path}")
    assert os.listdir(tmp_path) == []
    train.main(tiny_args(sft_dir, tmp_path, iters=1))               # free again once that run ends


# ----------------------------------------------------------------------------------------------
# the pi_init cache: rebuilt when damaged, written atomically, never half-written on a full disk

def cache_path(sft):
    (name,) = os.listdir(sft)
    return os.path.join(sft, name)


def test_a_damaged_cache_is_rebuilt(tmp_path, capsys):
    sft, args = str(tmp_path / "sft"), dict(sft_steps=2, iters=1)
    train.main(tiny_args(sft, tmp_path / "a", **args))
    write(os.path.join(cache_path(sft), "model.safetensors"), b"garbage", "wb")
    train.main(tiny_args(sft, tmp_path / "b", **args))
    assert "does not load" in capsys.readouterr().out
    GPT2LMHeadModel.from_pretrained(cache_path(sft))                # whole again


def test_a_cache_written_by_another_run_first_is_kept(tmp_path, monkeypatch):
    sft, save = str(tmp_path / "sft"), GPT2LMHeadModel.save_pretrained

    def save_while_another_run_finishes(self, path, **kwargs):
        save(self, path, **kwargs)
        save(self, path.split(".tmp")[0], **kwargs)                 # the other run renames its copy first
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", save_while_another_run_finishes)
    train.main(tiny_args(sft, tmp_path / "out", sft_steps=2, iters=1))
    GPT2LMHeadModel.from_pretrained(cache_path(sft))                # one cache, no temporary left


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_caching_leaves_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", no_space)
    sft = tmp_path / "sft"
    fails(tiny_args(str(sft), tmp_path / "out", sft_steps=2), "(No space left on device): nothing was cached")
    assert not sft.exists() or os.listdir(sft) == []


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(sft_dir, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def save_then_fill_the_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            with open(path, "wb") as f:                             # half a file, then the disk is full
                f.write(b"PK\x03\x04")
            no_space()
        save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    fails(tiny_args(sft_dir, tmp_path, iters=6, ckpt_every=2),
          f"could not write checkpoint {tmp_path / 'ckpt.pt'} at iteration 4 (No space left on device): "
          "the previous checkpoint is intact")
    monkeypatch.undo()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # no temporary file left
    train.main(tiny_args(sft_dir, tmp_path, iters=6, ckpt_every=2, resume=True))
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
