"""
Tests of the training script: the sampler, end-to-end runs of APA and PPO, resume after SIGKILL,
clear errors for bad input, non-finite updates, Hugging Face models. Run: pytest -q tests/test_train.py
(test_losses.py holds the tests of the losses themselves.)
"""
import ast
import collections
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import tiktoken
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

import data
import evaluation
import model
import train
from lab import checks, cli, lora, static_sampler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "sft"                   # one pi_init cache for every test file
    path.mkdir(exist_ok=True)
    return str(path)


def tiny_args(sft, out, /, **overrides):
    """A tiny configuration: 1-layer GPT, short pre-training, small batches."""
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=150, sft_lr=3e-3, iters=6,
                batch_size=16, minibatch_size=8, epochs=2, lr=1e-3, jstar_samples=0, sample_every=0, eval_every=0,
                target_kl=0, device="cpu", sft_dir=sft, out_dir=str(out))  # no guard; CPU numbers, even where CUDA is
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# data and sampler

def test_task_encoding_round_trips_and_takes_one_token_per_word():
    enc = data.task_encoding()
    text = "the plot was very dull but the cast was charming."
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and len(ids) == 11           # 10 words and the full stop
    odd = "Ünïcode, digits 123 and CAPS"                           # any text still encodes, byte by byte
    assert enc.decode(enc.encode_ordinary(odd)) == odd
    assert enc.eot_token == enc.n_vocab - 1


def test_sentiment_reward_counts_and_saturates():
    scores = data.sentiment_reward([""] * 5, [" great.", " dull and the plot was bad.", " long.",
                                              " great and the cast was superb but the music was brilliant.",
                                              " great but the ending was awful."])
    assert scores == [0.5, -1.0, 0.0, 1.0, 0.0]


def test_gpt2_bpe_matches_gpt2_ids():
    """data.get_encoding("gpt2") reads r50k_base, the one file of GPT-2's BPE that the offline cache holds (tiktoken's
    own "gpt2" needs two other files, from the network). Skipped only where r50k_base itself cannot be had."""
    try:
        tiktoken.get_encoding("r50k_base")
    except Exception as e:  # no cache (TIKTOKEN_CACHE_DIR) and no network
        pytest.skip(f"GPT-2 BPE unavailable offline: set TIKTOKEN_CACHE_DIR to a tiktoken cache ({e.__class__.__name__})")
    enc = data.get_encoding("gpt2")
    assert enc.encode("hello world") == [31373, 995] and enc.eot_token == 50256


def test_the_task_corpus_is_seeded_and_follows_its_grammar():
    """Each review is one to three clauses "the <subject> <verb> [<adverb>] <adjective>" joined by "and" or "but", one
    token a word and one for the full stop. Over 4000 reviews the shares are the grammar's weights, within 4 standard
    errors: 1, 2 or 3 clauses at 0.4, 0.4, 0.2; an adverb in 0.3 of the clauses; the three kinds of adjective alike.
    The seed picks the corpus: the same seed, the same reviews."""
    corpus, enc = data.task_corpus(4000), data.task_encoding()
    assert corpus == data.task_corpus(4000, seed=0) != data.task_corpus(4000, seed=1)
    words = lambda xs: "|".join(xs)
    clause = re.compile(rf"the ({words(data.SUBJECTS)}) ({words(data.VERBS)}) (?:({words(data.ADVERBS)}) )?(\w+)")
    n_clauses, adverbs, kinds = collections.Counter(), 0, collections.Counter()
    for text in corpus:
        assert text.endswith(".") and len(enc.encode_ordinary(text)) == len(text.replace(".", " .").split()), text
        clauses = re.split(r" (?:and|but) ", text[:-1])
        n_clauses[len(clauses)] += 1
        for c in clauses:
            m = clause.fullmatch(c)
            assert m, text
            adverbs += m.group(3) is not None
            kinds[next(k for k, xs in enumerate((data.POSITIVE, data.NEGATIVE, data.NEUTRAL)) if m.group(4) in xs)] += 1
    total = sum(kinds.values())
    for k, share in ((1, 0.4), (2, 0.4), (3, 0.2)):
        assert abs(n_clauses[k] / 4000 - share) < 4 * math.sqrt(share * (1 - share) / 4000)
    assert abs(adverbs / total - 0.3) < 4 * math.sqrt(0.3 * 0.7 / total)
    assert all(abs(kinds[k] / total - 1 / 3) < 4 * math.sqrt(2 / 9 / total) for k in range(3))


def test_the_task_prompts_and_the_held_out_ones():
    """The 40 training openings are each (subject, verb) once, one token a word. The 40 held-out ones add an adverb to
    each of them in turn, every adverb with every verb (2 or 3 times each of the 16 pairs), so that no adverb comes
    with one verb alone; none of them is a training opening."""
    enc, prompts, held_out = data.task_encoding(), data.task_prompts(), data.task_eval_prompts()
    assert sorted(prompts) == sorted(f"the {s} {v}" for s in data.SUBJECTS for v in data.VERBS)
    assert all(len(enc.encode_ordinary(p)) == 3 for p in prompts)
    assert [p.rsplit(" ", 1)[0] for p in held_out] == prompts and not set(held_out) & set(prompts)
    pairs = collections.Counter(tuple(p.split()[2:]) for p in held_out)
    assert set(pairs) == set(itertools.product(data.VERBS, data.ADVERBS)) and set(pairs.values()) == {2, 3}


def test_distinct_n_counts_the_words_and_full_stops_by_hand():
    """Two reviews of 5 tokens each (the full stop is one): 6 distinct words of 10, 6 distinct pairs of 8, 5 distinct
    triples of 6; a text shorter than n has no n-gram."""
    texts = ["the plot was dull.", "the cast was dull."]
    assert [data.distinct_n(texts, n) for n in (1, 2, 3)] == [6 / 10, 6 / 8, 5 / 6]
    assert data.distinct_n(["the end"], 3) == 0 and data.distinct_n(["the plot was dull."], 2) == 1


def test_sampler_logprobs_equal_full_forward_pass():
    torch.manual_seed(0)
    vocab, eot = 5, 4                                               # a small vocabulary, so end-of-text comes often
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                    bos_token_id=eot, eos_token_id=eot)).eval()
    prompts = [[0, 1, 2], [3], [1, 1, 0, 2, 3], [2, 0]]             # different lengths: left padding
    ids, mask = model.left_pad(prompts * 4, eot, torch.device("cpu"))
    response, resp_mask, sampler_logprobs = model.generate(lm, ids, mask, 12, eot)
    with torch.no_grad():
        logits, _ = model.lm_forward(lm, torch.cat([ids, response], 1),
                                     torch.cat([mask, torch.ones_like(response)], 1), ids.shape[1])
    full = model.token_logprobs(logits, response) * resp_mask
    torch.testing.assert_close(sampler_logprobs, full, atol=1e-5, rtol=1e-5)
    # the mask covers every token up to and including the first end-of-text, nothing after it
    for row, m in zip(response.tolist(), resp_mask.tolist()):
        n = row.index(eot) + 1 if eot in row else len(row)
        assert m == [1.0] * n + [0.0] * (len(row) - n)
    assert 0 < resp_mask.sum() < resp_mask.numel()                  # some rows did end early


# ----------------------------------------------------------------------------------------------
# end to end

@pytest.mark.parametrize("algo", ["apa", "ppo"])
def test_training_runs_and_reward_improves(algo, sft_dir, tmp_path):
    history = train.main(tiny_args(sft_dir, tmp_path, algo=algo, iters=30, batch_size=32, minibatch_size=16,
                                   jstar_samples=32))
    assert len(history) == 30 and read_metrics(tmp_path) == history
    for row in history:
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
        assert row["J"] == pytest.approx(row["reward"] - train.Config.lam * row["kl"], abs=1e-6)  # J = R - lambda KL
        assert row["steps"] == 2 * 32 // 16                              # epochs x minibatches
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    print(f"{algo}: reward {first:.3f} -> {last:.3f}, J* {history[0]['jstar']:.3f}")
    assert last > first + 0.2
    assert os.path.exists(tmp_path / "policy" / "value_head.pt")


def test_the_kl_guard_stops_a_runaway_update_and_says_so(sft_dir, tmp_path, capsys):
    """lr 0.05 wrecks the tiny GPT within an update; the guard stops each update once a minibatch's approx_kl
    exceeds target_kl, before its step, and the log line and metrics.jsonl say so."""
    history = train.main(tiny_args(sft_dir, tmp_path, iters=3, epochs=4, lr=0.05, target_kl=0.1))
    out = capsys.readouterr().out
    stopped = [row for row in history if "kl_stop" in row]
    assert stopped and out.count("target_kl: stopped at approx_kl") == len(stopped)
    for row in stopped:
        assert row["kl_stop"] > 0.1 and row["steps"] < 4 * 16 // 8 and row["approx_kl"] <= 0.1  # the steps taken
        assert f"after {row['steps']}/8 steps" in out
    assert all(math.isfinite(v) for row in history for v in row.values())
    assert read_metrics(tmp_path) == history


def test_every_draw_of_a_run_uses_the_sampler_the_run_chose(sft_dir, tmp_path, monkeypatch):
    """On a GPU a run samples with lab/static_sampler.py's CUDA graph: J*'s estimate, each rollout and each held-out
    evaluation must all draw with the sampler that choose_sampler picks. Checked on a CPU with a recording one."""
    rows = []

    def recording(lm, prompt_ids, *args):
        rows.append(len(prompt_ids))
        return model.generate(lm, prompt_ids, *args)
    monkeypatch.setattr(static_sampler, "choose_sampler", lambda cfg, device: recording)
    train.main(tiny_args(sft_dir, tmp_path, iters=2, jstar_samples=2, eval_every=1, eval_samples=8))
    assert rows == [40 * 2, 8, 16, 8, 16]                           # J*; then per iteration: evaluation, rollout


SCORED = []                                                             # the prompts recording_reward saw


def recording_reward(prompts, completions):
    SCORED.append(list(prompts))
    return data.sentiment_reward(prompts, completions)


def test_the_held_out_evaluation_samples_the_held_out_prompts(sft_dir, tmp_path):
    """Per iteration: the evaluation's 24 responses, to the held-out openings in turn, in batches of batch_size (16,
    then 8), then the rollout's 16, to the training ones; the two sets never meet."""
    SCORED.clear()
    train.main(tiny_args(sft_dir, tmp_path, iters=2, eval_every=1, eval_samples=24,
                         reward_fn="test_train:recording_reward"))
    assert [len(p) for p in SCORED] == [16, 8, 16] * 2
    held_out, training = data.task_eval_prompts(), set(data.task_prompts())
    assert not set(held_out) & training
    assert SCORED[0] + SCORED[1] == SCORED[3] + SCORED[4] == held_out[:24] and set(SCORED[2] + SCORED[5]) <= training


def test_prompts_of_your_own_have_no_held_out_prompts_unless_given(sft_dir, tmp_path, capsys):
    """With --prompts and no --eval_prompts nothing is held out: the embedded task's openings come from another task."""
    SCORED.clear()
    prompts = write(tmp_path / "p.txt", "the movie was\nthe plot felt\n")
    history = train.main(tiny_args(sft_dir, tmp_path / "out", iters=1, eval_every=1, prompts=prompts,
                                   reward_fn="test_train:recording_reward"))
    assert SCORED == [SCORED[0]] and set(SCORED[0]) == {"the movie was", "the plot felt"}
    assert not any(k.startswith("eval_") for k in history[0]) and "| 2 prompts | device" in capsys.readouterr().out


def test_a_run_that_asks_for_no_jstar_and_no_exact_gap_ignores_what_it_is_handed(sft_dir, tmp_path, capsys):
    """lab/compare.py hands each run the J* and the exact responses known for its pi_init (train.train's known); a
    run with --jstar_samples=0 and --exact_every=0 asked for neither, and logs neither gap."""
    cfg = cli.parse_args(train.Config, tiny_args(sft_dir, tmp_path, iters=2, jstar_samples=0, exact_every=0))
    history = train.train(cfg, {"jstar": (1.5, 0.25), "space": {"rewards": torch.zeros(3)}})
    assert len(history) == 2 and not [k for r in history for k in r if "gap" in k or "jstar" in k or "exact" in k]
    assert "J*" not in capsys.readouterr().out


def test_pre_training_keeps_torchs_threads_whatever_threads_says(tmp_path, monkeypatch):
    """The pi_init cache, and its rounding, must not depend on --threads: pre-training runs at the threads torch has,
    and --threads applies to the RL iterations after it."""
    seen = set()
    monkeypatch.setattr(model, "status", lambda text, done=False: seen.add(torch.get_num_threads()))  # each step
    torch.set_num_threads(2)
    train.main(tiny_args(str(tmp_path / "sft"), tmp_path / "out", sft_steps=2, iters=1, threads=3))
    assert seen == {2} and torch.get_num_threads() == 3


def test_grpo_and_rloo_train_no_value_head(sft_dir, tmp_path):
    """GRPO and RLOO have no use for values: their value head takes no gradient (under DDP a parameter that trains
    and gets none is an error) and their checkpoints hold none."""
    for algo in ("grpo", "rloo"):
        cfg = train.resolve(train.Config(algo=algo))
        policy, _ = lora.make_policy(cfg, model.tiny_gpt(cfg, 64), 64, torch.device("cpu"))
        assert not any(p.requires_grad for p in policy.v_head.parameters()) and policy.lm.lm_head.weight.requires_grad
    train.main(tiny_args(sft_dir, tmp_path, algo="grpo", iters=1))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["policy"]
    assert saved and not [k for k in saved if k.startswith("v_head.")]


def test_the_held_out_evaluation_forks_the_random_stream_of_the_gpu_it_samples_on():
    """The evaluation draws from a stream of its own: on a GPU it must fork that GPU's stream too, or the training
    numbers would change with eval_every there. Checked on a CPU as the choice of devices to fork."""
    assert evaluation.stream_devices(torch.device("cuda", 1)) == [torch.device("cuda", 1)]
    assert evaluation.stream_devices(torch.device("cpu")) == []


def test_a_lora_checkpoint_holds_only_what_trains(sft_dir, tmp_path):
    """GPT-2's LM head shares the token embedding: with LoRA on the head, the frozen embedding has a second name,
    the head's base layer. The checkpoint holds the adapters and the value head, neither name."""
    pytest.importorskip("peft")
    train.main(tiny_args(sft_dir, tmp_path, iters=1, lora_r=4))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["policy"]
    assert saved and all("lora_" in name or name.startswith("v_head.") for name in saved), sorted(saved)


def test_held_out_evaluation_is_logged_and_changes_no_training_number(sft_dir, tmp_path, capsys):
    args = dict(iters=4, eval_samples=24)
    plain = train.main(tiny_args(sft_dir, tmp_path / "plain", **args))
    held = train.main(tiny_args(sft_dir, tmp_path / "held", eval_every=2, **args))
    out = capsys.readouterr().out
    assert out.count("| 40 prompts (40 held out) |") == 1                # the header of the run that evaluates
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    assert [("eval_reward" in row, "eval_reward" in line) for row, line in zip(held, lines[4:])] == \
        [(True, True), (True, True), (False, False), (True, True)]      # the first, then every eval_every-th
    timing = ("ms", "mem_mb")
    assert [{k: v for k, v in row.items() if k not in timing} for row in plain] == \
        [{k: v for k, v in row.items() if k not in timing and not k.startswith("eval_")} for row in held]
    first = held[0]                                                     # pi_init itself: KL 0 up to rounding
    assert abs(first["eval_kl"]) < 1e-4 and first["eval_J"] == pytest.approx(first["eval_reward"] - 0.1 * first["eval_kl"], abs=1e-6)


def run_script(args, **kwargs):
    """train.py in a subprocess, with SIGINT at its default: Ctrl-C reaches it even when the tests run as a
    background job, which starts with SIGINT ignored (and Python keeps it ignored)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=HERE)      # the tests' reward functions live here
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_resume_after_sigkill_matches_uninterrupted_run(lora_r, sft_dir, tmp_path):
    if lora_r:
        pytest.importorskip("peft")
    train.main(tiny_args(sft_dir, tmp_path / "warm", iters=1))      # pre-train pi_init once, outside the timing
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = dict(iters=10, ckpt_every=3, seed=7, lora_r=lora_r)
    assert run_script(tiny_args(sft_dir, straight, **args)).wait() == 0
    proc = run_script(tiny_args(sft_dir, killed, **args))
    for line in proc.stdout:                                        # kill it after iteration 7, mid-way
        if line.startswith("iter 7/"):                              # between checkpoints 6 and 9
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(killed)) == 7 and not os.path.exists(killed / "policy")
    resumed = run_script(tiny_args(sft_dir, killed, resume=True, **args))
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resumed from" in out and "at iteration 6" in out
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["iter"] for r in b] == list(range(1, 11))             # nothing lost, nothing twice
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in ("ms", "mem_mb")} == \
            {k: v for k, v in rb.items() if k not in ("ms", "mem_mb")}
    wa = GPT2LMHeadModel.from_pretrained(straight / "policy").state_dict()
    wb = GPT2LMHeadModel.from_pretrained(killed / "policy").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)               # bit for bit on a CPU


# ----------------------------------------------------------------------------------------------
# bad input: one clear error, nothing overwritten

def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


def short_reward(prompts, completions):
    return [0.0] * (len(completions) - 1)


def write(path, content, mode="w"):
    with open(path, mode) as f:
        f.write(content)
    return str(path)


BAD_INPUTS = {
    "empty prompts file": (lambda tmp: dict(prompts=write(tmp / "p.txt", "\n\n")), "holds no prompt"),
    "non-UTF-8 prompts": (lambda tmp: dict(prompts=write(tmp / "p.txt", b"the \xff movie\n", "wb")), "not UTF-8"),
    "bad JSONL prompts": (lambda tmp: dict(prompts=write(tmp / "p.jsonl", '{"text": "x"}\n')), '"prompt"'),
    "lambda <= 0": (lambda tmp: dict(lam=0), "lam must be > 0"),
    "batch % minibatch": (lambda tmp: dict(batch_size=10, minibatch_size=4), "not divisible"),
    "unknown algorithm": (lambda tmp: dict(algo="dpo"), "invalid choice"),
    "missing model path": (lambda tmp: dict(init=str(tmp / "no_model")), "does not exist"),
    "missing prompts file": (lambda tmp: dict(prompts=str(tmp / "none.txt")), "does not exist"),
    "NaN reward": (lambda tmp: dict(reward_fn="test_train:nan_reward"), "non-finite"),
    "wrong reward shape": (lambda tmp: dict(reward_fn="test_train:short_reward"), "scores for"),
    "unknown reward function": (lambda tmp: dict(reward_fn="test_train:nope"), "not found"),
    "unknown flag": (lambda tmp: dict(learning_rate=1), "unknown argument"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_error_and_overwrites_nothing(case, sft_dir, tmp_path):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    out.mkdir()
    previous = write(out / "metrics.jsonl", '{"iter": 1}\n')      # a previous run's output
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(sft_dir, out, **make_args(tmp_path)))
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert open(previous).read() == '{"iter": 1}\n' and os.listdir(out) == ["metrics.jsonl"]


def test_bad_input_exit_code_and_single_stderr_line(tmp_path):
    proc = run_script(["--lam=-1", f"--out_dir={tmp_path}"])
    out, err = proc.communicate()
    assert proc.returncode == 1 and err.strip() == "error: lam must be > 0, got -1.0" and out == ""


# ----------------------------------------------------------------------------------------------
# non-finite updates never reach a checkpoint

CALLS = {"n": 0}


def exploding_reward(prompts, completions):
    """Sensible for two rollouts, then huge (finite) scores whose squares overflow float32."""
    CALLS["n"] += 1
    return data.sentiment_reward(prompts, completions) if CALLS["n"] <= 2 else [1e30] * len(completions)


def test_non_finite_updates_are_skipped_then_stop_with_clean_checkpoint(sft_dir, tmp_path, capsys):
    CALLS["n"] = 0
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(sft_dir, tmp_path, reward_fn="test_train:exploding_reward", ckpt_every=1,
                             max_bad_steps=3))
    assert "3 non-finite updates in a row" in str(e.value.code)
    assert capsys.readouterr().out.count("step skipped") == 3
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["iter"] == 2                                       # the last clean iteration
    assert all(torch.isfinite(v).all() for v in state["policy"].values() if v.is_floating_point())
    assert len(read_metrics(tmp_path)) == 2


def test_bad_steps_are_skipped_and_only_enough_of_them_in_a_row_stop_the_run(capsys):
    """lab/checks.py's BadSteps, as update() uses it: a non-finite loss or gradient norm skips the step; a finite
    step starts the count again; max_bad_steps in a row end the run."""
    bad_steps, fine, nan = checks.BadSteps(3), torch.tensor(1.0), torch.tensor(float("nan"))
    skips = [bad_steps.skip(*step) for step in [(1.0, fine), (float("inf"), fine), (1.0, nan), (0.5, fine),
                                                (float("nan"), fine), (1.0, nan)]]
    assert skips == [False, True, True, False, True, True] and capsys.readouterr().out.count("step skipped") == 4
    with pytest.raises(FloatingPointError, match="3 non-finite updates in a row"):
        bad_steps.skip(float("inf"), fine)
    first = checks.BadSteps(2)                                          # bad from the first step: counted from 0
    assert first.skip(float("nan"), fine)
    with pytest.raises(FloatingPointError, match="2 non-finite updates in a row"):
        first.skip(float("nan"), fine)


def zero_reward(prompts, completions):
    """A reward that tells no response from another, as the embedded task's does on a real model's text."""
    return [0.0] * len(completions)


def test_a_run_whose_rewards_are_all_equal_says_so_once(sft_dir, tmp_path, capsys):
    """Every response of every batch gets the same reward: one warning, before the first iteration's line, that
    names the reward, the value and the count. A run whose first batch has two different rewards prints none."""
    train.main(tiny_args(sft_dir, tmp_path / "zero", iters=3, reward_fn="test_train:zero_reward"))
    out = capsys.readouterr().out
    warning = ("warning: the reward test_train:zero_reward is 0.000 for all 16 responses: nothing to learn from "
               "(docs/models.md: a reward that cannot tell responses apart)")
    assert out.count("warning:") == 1 and out.index(warning) < out.index("iter 1/3")
    train.main(tiny_args(sft_dir, tmp_path / "task", iters=3))
    assert "warning" not in capsys.readouterr().out


def test_init_with_a_gguf_file_says_how_to_convert_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as e:
        train.main([f"--init={tmp_path / 'model.gguf'}", f"--out_dir={tmp_path / 'out'}"])
    assert str(e.value.code) == (f"error: --init={tmp_path / 'model.gguf'} is a GGUF file: convert it into a Hugging "
                                 f"Face folder once, python -m lab.smollm2 --gguf={tmp_path / 'model.gguf'} "
                                 "--out=FOLDER, then give --init=FOLDER")
    assert not (tmp_path / "out").exists()


def test_same_rewards_judges_the_first_batch_of_all_processes(capsys):
    """lab/checks.py's SameRewards: the first batch with two responses decides; later batches are never judged, so
    a policy that earns the top reward everywhere is not warned about; a batch of one response decides nothing."""
    cfg = train.resolve(train.Config(reward_fn="m:f"))
    for batches, warned in [([[1.0]], 0), ([[1.0], [0.5, 0.5]], 1), ([[0.5, 0.5], [0.5, 0.5]], 1),
                            ([[0.0, 1.0], [1.0, 1.0]], 0)]:
        same = checks.SameRewards(cfg)
        for scores in batches:
            same.check([("p", "c", score, 0.0) for score in scores])
        out = capsys.readouterr().out
        assert out.count("warning: the reward m:f is 0.500 for all 2 responses") == warned, batches
        assert out.count("warning") == warned
    same = checks.SameRewards(train.resolve(train.Config(reward_model="rm")))  # a reward model is named as one
    same.check([("p", "c", 0.5, 0.0)] * 2)
    assert "warning: the reward model rm is 0.500 for all 2 responses" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Hugging Face models: a policy and a reward model saved to disk, then loaded back

def save_tiny_hf_models(tmp_path):
    """A tiny GPT-2 policy, saved in bfloat16 as many hub checkpoints are, and a tiny GPT-2 reward model.
    Both keep GPT-2's default dropout of 0.1."""
    enc = data.task_encoding()
    config = dict(vocab_size=enc.n_vocab, n_positions=48, n_embd=32, n_layer=1, n_head=2,
                  bos_token_id=enc.eot_token, eos_token_id=enc.eot_token)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**config)).to(torch.bfloat16).save_pretrained(tmp_path / "policy_init")
    GPT2ForSequenceClassification(GPT2Config(num_labels=1, **config)).save_pretrained(tmp_path / "reward_model")
    return [f"--init={tmp_path / 'policy_init'}", f"--reward_model={tmp_path / 'reward_model'}", "--tokenizer=task",
            "--batch_size=8", "--minibatch_size=4", "--max_new_tokens=8", "--jstar_samples=0", "--sample_every=0"]


def test_hugging_face_policy_and_reward_model(tmp_path):
    out = tmp_path / "out"
    history = train.main(save_tiny_hf_models(tmp_path) + ["--iters=3", "--epochs=1", "--lr=1e-3", f"--out_dir={out}"])
    assert len(history) == 3 and all(abs(r["reward"]) > 0 for r in history)
    init = GPT2LMHeadModel.from_pretrained(tmp_path / "policy_init", dtype=torch.float32).state_dict()
    trained = GPT2LMHeadModel.from_pretrained(out / "policy").state_dict()
    assert init.keys() == trained.keys()
    assert all(v.dtype == torch.float32 for v in trained.values() if v.is_floating_point())  # trained in fp32
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # it trained
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())


def test_update_sees_the_sampling_policy_despite_dropout(tmp_path):
    """With lr = 0 nothing moves, so the update's log-probs and values must equal the rollout's: no dropout
    (GPT-2's 0.1 made approx_kl about 1e-3 and clipped 9% of the values)."""
    history = train.main(save_tiny_hf_models(tmp_path) + ["--algo=ppo", "--iters=1", "--epochs=2", "--lr=0",
                                                          f"--out_dir={tmp_path / 'out'}"])
    assert history[0]["approx_kl"] < 1e-9 and history[0]["clipfrac"] == 0 and history[0]["vf_clipfrac"] == 0


def test_fresh_run_keeps_an_older_run_aside(sft_dir, tmp_path):
    """A fresh run moves an older run's results to previous/N before writing, so that a fresh run that dies
    early loses nothing and leaves no older ckpt.pt for --resume to mix in."""
    train.main(tiny_args(sft_dir, tmp_path, iters=4, ckpt_every=2, seed=1))
    older = read_metrics(tmp_path)
    CALLS["n"] = 0
    with pytest.raises(SystemExit):                                 # dies in its third update
        train.main(tiny_args(sft_dir, tmp_path, reward_fn="test_train:exploding_reward", ckpt_every=0,
                             max_bad_steps=1, seed=2))
    assert not os.path.exists(tmp_path / "ckpt.pt") and len(read_metrics(tmp_path)) == 2
    assert torch.load(tmp_path / "previous" / "1" / "ckpt.pt", weights_only=False)["iter"] == 4
    assert read_metrics(tmp_path / "previous" / "1") == older and os.path.isdir(tmp_path / "previous" / "1" / "policy")
    with open(tmp_path / "previous" / "1" / "config.json") as f:   # the settings that made those metrics
        assert json.load(f)["seed"] == 1
    history = train.main(tiny_args(sft_dir, tmp_path, iters=3, resume=True, seed=2))
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3] and len(history) == 3  # started afresh
    assert len(read_metrics(tmp_path / "previous" / "2")) == 2 and read_metrics(tmp_path / "previous" / "1") == older


def test_sample_from_a_trained_policy_in_a_fresh_shell(sft_dir, tmp_path):
    """--sample loads out/policy with its run's tokenizer and reward, from any working directory."""
    train.main(tiny_args(sft_dir, tmp_path / "out", iters=1))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--sample={tmp_path / 'out' / 'policy'}",
                           "--prompt=the movie was", "--num_samples=3"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        prompt, rest = line.split(" -> ")
        completion, reward = rest.rsplit(" | reward ", 1)
        assert prompt == "'the movie was'"
        assert float(reward) == data.sentiment_reward(["the movie was"], [ast.literal_eval(completion)])[0]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--sample={tmp_path}"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "apa_config.json is missing" in proc.stderr
