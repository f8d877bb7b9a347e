"""
Tests of reward_model.py: the Bradley-Terry loss against a slow version and against theory (its population
minimiser is R / beta + c, docs/theory.md section 10), the simulated annotator, the trained model against the true
reward, the saved folder as train.py reads it, and the preference file. Run: pytest -q tests/test_reward_model.py
"""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

import data
import reward_model
import train
from lab import runs
from lab.hf import HFTokenizer, reward_model_fn
from test_cli import one_line_error
from test_train import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=150, sft_lr=3e-3, device="cpu")  # test_train's
FAST = dict(pairs=2000, epochs=4, lr=3e-3, beta=0.5)             # 5 s on the tiny pi_init


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """The tiny pi_init's cache: tools/mutate.py's shared one, or the one test_train.py's tests use."""
    path = os.environ.get("APA_TEST_SFT_DIR") or str(tmp_path_factory.getbasetemp() / "sft")
    os.makedirs(path, exist_ok=True)
    return path


def rm_args(sft_dir, out_dir, **overrides):
    return [f"--{k}={v}" for k, v in (TINY | dict(sft_dir=sft_dir, out_dir=out_dir) | overrides).items()]


@pytest.fixture(scope="module")
def trained(sft_dir, tmp_path_factory):
    """A reward model trained on the embedded task's pairs with FAST (seed 0): its metrics and folder."""
    out = str(tmp_path_factory.mktemp("reward_model") / "rm")
    return reward_model.main(rm_args(sft_dir, out, **FAST)), out


# ----------------------------------------------------------------------------------------------
# the loss, against a slow version and against theory

def slow_bradley_terry(chosen, rejected):
    """-log sigmoid(d) = log(1 + exp(-d)), pair by pair in Python floats, written so that no exp overflows."""
    losses = [math.log1p(math.exp(-d)) if d > 0 else -d + math.log1p(math.exp(d))
              for d in (c - r for c, r in zip(chosen, rejected))]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(losses) / len(losses), sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def test_bradley_terry_loss_against_a_python_loop():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(50, dtype=torch.float64) * 3, torch.randn(50, dtype=torch.float64) * 3  # (B,)
    chosen[:2], rejected[:2] = torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0])  # no overflow
    chosen[2:5] = rejected[2:5]                                                 # ties: not ordered right
    loss, stats = reward_model.bradley_terry_loss(chosen, rejected)
    want_loss, want_accuracy, want_margin = slow_bradley_terry(chosen.tolist(), rejected.tolist())
    assert loss.item() == pytest.approx(want_loss, rel=1e-6) and math.isfinite(loss.item())
    assert stats == pytest.approx({"accuracy": want_accuracy, "margin": want_margin}, rel=1e-6)
    assert isinstance(stats["accuracy"], float) and isinstance(stats["margin"], float)


# deliberately wrong Bradley-Terry losses: each must fail the theory tests below
def with_margin(chosen, rejected):
    return -F.logsigmoid(chosen - rejected - 0.5).mean(), {}


def flipped_sign(chosen, rejected):
    return -F.logsigmoid(rejected - chosen).mean(), {}


def without_log(chosen, rejected):
    return -torch.sigmoid(chosen - rejected).mean(), {}


def hinge(chosen, rejected):
    return torch.relu(1 - (chosen - rejected)).mean(), {}


def population(n=6, prompts=2, seed=0):
    """Two prompts, n responses each: true rewards R (prompts, n) with ties, and a full-support sampler mu."""
    g = torch.Generator().manual_seed(seed)
    R = torch.tensor([[-1.0, -0.5, 0.0, 0.0, 0.5, 1.0], [1.0, 0.5, 0.5, -0.5, 0.0, -1.0]], dtype=torch.float64)
    mu = torch.softmax(torch.randn(prompts, n, generator=g, dtype=torch.float64), 1)  # (prompts, n) pi_init
    return R[:prompts, :n], mu


def population_loss(loss_fn, r, R, mu, beta):
    """The exact expected loss over pairs (y, y') ~ mu x mu of each prompt and the annotator's label: every ordered
    pair with each of its two labels, each weighted by its probability, each through loss_fn on a batch of one."""
    total = 0.0
    for x, i, j in itertools.product(range(R.shape[0]), range(R.shape[1]), range(R.shape[1])):
        p = torch.sigmoid((R[x, i] - R[x, j]) / beta)                            # P(y_i preferred to y_j)
        chosen_i, _ = loss_fn(r[x, i:i + 1], r[x, j:j + 1])
        chosen_j, _ = loss_fn(r[x, j:j + 1], r[x, i:i + 1])
        total = total + mu[x, i] * mu[x, j] * (p * chosen_i + (1 - p) * chosen_j)
    return total


def minimise(loss_fn, R, mu, beta):
    """The population loss's minimiser, by L-BFGS in float64 from r = 0."""
    r = torch.zeros_like(R, requires_grad=True)
    opt = torch.optim.LBFGS([r], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = population_loss(loss_fn, r, R, mu, beta)
        loss.backward()
        return loss
    opt.step(closure)
    return r.detach()


def centred(r):
    """r minus its mean over each prompt's responses: what is left once c(x) is taken out."""
    return r - r.mean(1, keepdim=True)


BETA = 0.5


def test_the_population_gradient_is_zero_at_true_reward_over_beta_for_every_constant():
    R, mu = population()
    for c in ([0.0, 0.0], [3.0, -7.0]):                                          # c(x), one per prompt
        r = (R / BETA + torch.tensor(c, dtype=torch.float64)[:, None]).requires_grad_(True)
        population_loss(reward_model.bradley_terry_loss, r, R, mu, BETA).backward()
        assert r.grad.abs().max() < 1e-14
    # and for the wrong losses it is not: R / beta is no stationary point of theirs
    for wrong in (with_margin, flipped_sign, without_log, hinge):
        r = (R / BETA).clone().requires_grad_(True)
        population_loss(wrong, r, R, mu, BETA).backward()
        assert r.grad.abs().max() > 1e-3, wrong.__name__


@pytest.mark.parametrize("loss_fn, recovers", [(reward_model.bradley_terry_loss, True), (with_margin, False),
                                               (flipped_sign, False), (without_log, False), (hinge, False)],
                         ids=["bradley_terry", "with_margin", "flipped_sign", "without_log", "hinge"])
def test_the_population_minimiser_is_true_reward_over_beta_plus_a_constant(loss_fn, recovers):
    """Minimised exactly (float64, every pair), the Bradley-Terry loss gives r = R / beta + c(x); the wrong losses
    do not. The policy that r induces at lambda is then R's pi* at lambda * beta."""
    R, mu = population()
    r = minimise(loss_fn, R, mu, BETA)
    error = (centred(r) - centred(R / BETA)).abs().max().item()
    if not recovers:
        assert not error < 0.05, (loss_fn.__name__, error)                       # NaN counts as not recovered
        return
    assert error < 1e-6
    lam = 0.3
    induced = torch.softmax(mu.log() + r / lam, 1)                               # pi_init exp(r / lambda) / Z
    assert torch.allclose(induced, torch.softmax(mu.log() + R / (lam * BETA), 1), atol=1e-7)  # R's pi* at lam beta
    assert not torch.allclose(induced, torch.softmax(mu.log() + R / lam, 1), atol=1e-2)       # not R's pi* at lam


def test_annotator_prefers_y1_with_probability_sigmoid_of_the_gap_over_beta():
    torch.manual_seed(0)
    n, beta = 20_000, 0.5
    for gap in (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0):
        first = reward_model.annotate(torch.full((n,), gap), torch.zeros(n), beta)
        p = 1 / (1 + math.exp(-gap / beta))
        assert abs(first.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, gap


def test_spearman_of_a_value_that_is_not_finite_is_nan():
    assert math.isnan(reward_model.spearman([0.0, 1.0, float("nan")], [0.0, 1.0, 2.0]))
    assert math.isnan(reward_model.spearman([0.0, 1.0, 2.0], [0.0, float("inf"), 2.0]))


def slow_held_out(r, true, prompts):
    """held_out_stats's accuracy, accuracy against R and slope within prompts, pair by pair in Python floats."""
    r, true = r.tolist(), true.tolist()
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    untied = [k for k, t in enumerate(true) if t[0] != t[1]]
    mean = {p: [sum(v[k][j] for k in range(len(v)) if prompts[k] == p for j in (0, 1)) / (2 * prompts.count(p))
                for v in (r, true)] for p in set(prompts)}
    rc = [r[k][j] - mean[prompts[k]][0] for k in range(len(r)) for j in (0, 1)]
    tc = [true[k][j] - mean[prompts[k]][1] for k in range(len(r)) for j in (0, 1)]
    return {"accuracy": sum(a > b for a, b in r) / len(r),
            "accuracy_true": sum(sign(r[k][0] - r[k][1]) == sign(true[k][0] - true[k][1]) for k in untied) / len(untied),
            "slope": sum(a * b for a, b in zip(rc, tc)) / sum(b * b for b in tc)}


def test_held_out_stats_against_a_python_loop_and_the_slope_within_prompts_is_one_over_beta():
    """At the population minimiser r = R / beta + c(x), the slope of r on R within prompts is 1 / beta exactly,
    whatever c(x); pooled over prompts it is not, since each prompt's c(x) moves its responses together. An untrained
    model (every r equal) orders no pair, against the labels or against R."""
    g = torch.Generator().manual_seed(0)
    n, beta = 90, 0.5
    prompts = [f"prompt {k % 3}" for k in range(n)]
    c = torch.tensor([[4.0], [-3.0], [0.5]], dtype=torch.float64)[[k % 3 for k in range(n)]]  # (n, 1) c(x)
    true = torch.randn(n, 2, generator=g, dtype=torch.float64) + c / 2                       # R's means differ too
    true[:6, 1] = true[:6, 0]                                                               # ties of R
    r = true / beta + c
    stats = reward_model.held_out_stats(r, true, prompts)
    assert stats["slope"] == pytest.approx(1 / beta, abs=1e-12) and stats["accuracy_true"] == 1 and stats["ties"] == 6
    pooled = torch.cov(torch.stack([r.flatten(), true.flatten()]))[0, 1] / true.flatten().var()
    assert abs(pooled - 1 / beta) > 0.5                                       # the pooled slope misses 1 / beta
    noisy = r + torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    noisy[10:14, 1] = noisy[10:14, 0]                                         # ties of r
    for scores in (noisy, -noisy, torch.zeros(n, 2, dtype=torch.float64)):
        got, want = reward_model.held_out_stats(scores, true, prompts), slow_held_out(scores, true, prompts)
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    untrained = reward_model.held_out_stats(torch.zeros(n, 2), true, prompts)
    assert untrained["accuracy"] == 0 and untrained["accuracy_true"] == 0
    assert reward_model.held_out_stats(torch.zeros(n, 2)) == {"pairs": n, "accuracy": 0.0}


def test_the_classifier_starts_from_pi_inits_network_and_a_score_head_of_zero():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=5)).eval()
    rm = reward_model.reward_model_from(lm, 7)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == 7
    theirs = rm.base_model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in lm.transformer.state_dict().items())
    assert not rm.score.weight.any()                                          # every reward 0 at the start
    ids = [[1, 2, 3], [4, 9]]
    assert reward_model.rewards(rm, ids, 7).tolist() == [0.0, 0.0]
    with torch.no_grad():
        rm.score.weight.normal_()
        want = [rm.score(lm.transformer(torch.tensor([t])).last_hidden_state[0, -1]).item() for t in ids]
        assert reward_model.rewards(rm, ids, 7).tolist() == pytest.approx(want, abs=1e-5)


def test_spearman_against_a_python_loop():
    x = [0.3, -1.2, 0.3, 2.0, 0.3, -1.2, 5.0, 0.0]                             # ties on both sides
    y = [1.0, 0.5, -0.5, 1.0, 0.0, 0.5, 0.5, -1.0]
    def ranks(v):                                                               # 1 + smaller, ties their mean
        return [sum(b < a for b in v) + (sum(b == a for b in v) - 1) / 2 for a in v]
    a, b = ranks(x), ranks(y)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    want = cov / math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))
    assert reward_model.spearman(x, y) == pytest.approx(want, abs=1e-12)
    assert reward_model.spearman(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# the pairs of the embedded task, and the trained model against the true reward

def test_task_pairs_are_seeded_and_carry_their_true_rewards(sft_dir, monkeypatch):
    """The pairs are the same for the same seed, each carries R of its two responses, and the annotator labels them
    with those rewards R at cfg.beta (not R / beta, which would label at beta squared)."""
    cfg = reward_model.Config(**TINY, sft_dir=sft_dir, beta=0.5)
    enc = data.task_encoding()
    lm = runs.load_pi_init(cfg, enc, [], [], torch.device("cpu"))
    drawn, labelled, annotate = [], [], reward_model.annotate
    monkeypatch.setattr(reward_model, "annotate",
                        lambda r1, r2, beta: labelled.append((r1, r2, beta, annotate(r1, r2, beta))) or labelled[-1][3])
    for _ in range(2):
        torch.manual_seed(3)
        drawn.append(reward_model.task_pairs(cfg, lm, enc, data.task_prompts(), 64, torch.device("cpu")))
    (pairs, true), (again, true_again) = drawn
    r1, r2, beta, first = labelled[0]
    assert beta == 0.5 and torch.equal(torch.where(first, r1, r2), true[:, 0]) and torch.equal(torch.where(first, r2, r1), true[:, 1])
    assert pairs == again and torch.equal(true, true_again) and true.shape == (64, 2)
    assert [p for p, _, _ in pairs] != [pairs[0][0]] * 64 and all(p in data.task_prompts() for p, _, _ in pairs)
    for column, k in ((0, 1), (1, 2)):                                          # R(chosen), R(rejected)
        assert true[:, column].tolist() == data.sentiment_reward([p[0] for p in pairs], [p[k] for p in pairs])


def test_the_trained_model_orders_held_out_pairs_as_the_true_reward(trained):
    """Seed 0 measured: accuracy 0.93 against R's order (ties excluded), Spearman 0.88 (seeds 1-3: 0.91-0.92 and
    0.86-0.88); the labels themselves agree with R's order on 0.78 of the untied pairs (beta = 0.5)."""
    metrics, out = trained
    assert metrics["accuracy_true"] > 0.85 and metrics["spearman"] > 0.8
    assert metrics["accuracy_true"] > metrics["labels_true"]                    # it learned past the labels' noise
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(metrics))


def test_the_folder_loads_as_a_one_label_classifier_and_train_py_reads_the_same_scores(trained, sft_dir, tmp_path):
    _, out = trained
    enc = data.task_encoding()
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == enc.eot_token
    assert not os.path.exists(os.path.join(out, "tokenizer_config.json"))       # the task's tokenizer is tiktoken's
    prompts = ["the movie was", "the plot felt quite", "the cast is", "the music seemed"]
    completions = [" great.", " dull but the ending was superb and the cast was charming.", "", " \ufffd slow."]
    with torch.no_grad():
        ours = reward_model.rewards(rm, [reward_model.encode(enc, p + c) for p, c in zip(prompts, completions)],
                                    enc.eot_token)
    theirs = reward_model_fn(out, enc, torch.device("cpu"))(prompts, completions)
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)
    assert max(theirs) - min(theirs) > 0.1                                        # a trained model, not a constant
    history = train.main(tiny_args(sft_dir, tmp_path / "rl", reward_model=out, iters=2))
    assert len(history) == 2 and all(math.isfinite(h["reward"]) for h in history)


def test_the_two_responses_of_a_pair_answer_its_prompt(monkeypatch):
    """Each pair is two responses to one prompt: with a sampler that answers each prompt with the prompt itself,
    each pair's two texts are its prompt."""
    enc = data.task_encoding()
    monkeypatch.setattr(reward_model, "generate", lambda lm, ids, mask, *_: (ids, None, None))  # the prompt echoed
    torch.manual_seed(0)
    pairs, _ = reward_model.task_pairs(reward_model.Config(), None, enc, data.task_prompts(), 200, torch.device("cpu"))
    assert len({p for p, _, _ in pairs}) > 20
    assert all(chosen == rejected == prompt for prompt, chosen, rejected in pairs)


@pytest.fixture(scope="module")
def spied(sft_dir, tmp_path_factory):
    """A short run on the embedded task (36 pairs to train on, 9 held out, batches of 16: the last one partial,
    2 epochs: 6 steps), recording the prompts its pairs are drawn on, and the learning rate and gradient norm of each
    optimizer step."""
    drawn, steps = [], []
    task_pairs = reward_model.task_pairs

    class AdamW(torch.optim.AdamW):
        def step(self, closure=None):
            norm = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]).norm()
            steps.append((self.param_groups[0]["lr"], norm.item()))
            return super().step(closure)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reward_model, "task_pairs", lambda cfg, lm, enc, prompts, n, device: drawn.append((prompts, n))
                   or task_pairs(cfg, lm, enc, prompts, n, device))
        mp.setattr(torch.optim, "AdamW", AdamW)
        out = str(tmp_path_factory.mktemp("spied") / "rm")
        reward_model.main(rm_args(sft_dir, out, pairs=45, held_out=0.2, batch_size=16, epochs=2, lr=1e-2,
                                  max_grad_norm=1e-3, max_new_tokens=6))
    return drawn, steps


def test_the_held_out_pairs_are_drawn_on_the_held_out_prompts(spied):
    drawn, _ = spied
    assert [(n, prompts == data.task_prompts(), prompts == data.task_eval_prompts()) for prompts, n in drawn] == [
        (36, True, False), (9, False, True)]
    assert not set(data.task_prompts()) & set(data.task_eval_prompts())


def test_the_learning_rate_decays_linearly_to_zero_over_every_step_the_last_partial_batch_included(spied):
    _, steps = spied
    assert [lr for lr, _ in steps] == pytest.approx([1e-2 * (1 - s / 6) for s in range(6)], rel=1e-12)


def test_gradients_are_clipped_to_max_grad_norm(spied):
    _, steps = spied
    norms = [norm for _, norm in steps]
    assert max(norms) <= 1e-3 * (1 + 1e-4) and min(norms) == pytest.approx(1e-3, rel=1e-4), norms


def test_a_text_longer_than_the_context_is_read_as_train_py_reads_it(trained):
    """The embedded task's responses may be longer than the context: training keeps their last tokens, as
    lab/hf.reward_model_fn does when it scores them."""
    _, out = trained
    enc = data.task_encoding()
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    prompts, completions = ["the movie was", "the plot felt"], [" great and superb" * 12 + " but dull", " dull" * 40]
    tokens = reward_model.tokenize([(p, c, " fine.") for p, c in zip(prompts, completions)], enc, 32)
    assert all(len(t) == 32 for t, _ in tokens) and len(reward_model.encode(enc, prompts[0] + completions[0])) > 40
    with torch.no_grad():
        ours = reward_model.rewards(rm, [t for t, _ in tokens], enc.eot_token)
    theirs = reward_model_fn(out, enc, torch.device("cpu"))(prompts, completions)
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)


def tokenizer_with_pad_and_start(path):
    """test_models.py's BPE with a pad token and a start token of its own, which it puts before every text."""
    from test_models import bpe
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_str(bpe().to_str())
    tok.add_special_tokens(["<pad>", "<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<s>")
    fast.save_pretrained(path)
    return fast


def test_init_with_a_pad_and_a_start_token_of_its_own_trains_on_the_tokens_train_py_scores(tmp_path):
    """A tokenizer with a pad token other than its end-of-text and a start token it adds: the reward model pads with
    that pad token and trains on texts with the start token, and a text longer than the context is cut on the left,
    as lab/hf.reward_model_fn reads them at RL time."""
    from test_models import make_config
    from transformers import AutoModelForCausalLM
    tok = tokenizer_with_pad_and_start(tmp_path / "init")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("gpt2", len(tok), tok.eos_token_id)).save_pretrained(tmp_path / "init")
    out = str(tmp_path / "rm")
    reward_model.main([f"--init={tmp_path / 'init'}", f"--out_dir={out}", "--pairs=40", "--epochs=1", "--lr=1e-2",
                       "--max_new_tokens=8", "--device=cpu"])
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = HFTokenizer(out)
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    prompts, completions = ["the movie was", "the plot felt", "the cast"], [" great.", " dull" * 80, " fine but slow"]
    tokens = [t for t, _ in reward_model.tokenize([(p, c, "") for p, c in zip(prompts, completions)], enc, 64)]
    assert all(t[0] == tok.bos_token_id for t in tokens) and len(tokens[1]) == 64
    assert tokens[1][-20:] == tok(prompts[1] + completions[1])["input_ids"][-20:]       # its last tokens kept
    assert tokens[1][-20:] == tok(prompts[1] + completions[1])["input_ids"][-20:]       # its last tokens kept
    with torch.no_grad():
        ours = reward_model.rewards(rm, tokens, tok.pad_token_id)
    theirs = reward_model_fn(out, data.task_encoding(), torch.device("cpu"))(prompts, completions)
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# the preference file

def write_lines(path, lines, raw=b""):
    path.write_bytes("\n".join(lines).encode() + raw)
    return str(path)


def test_both_layouts_read_and_score_the_same_texts(tmp_path):
    explicit = write_lines(tmp_path / "a.jsonl", [
        json.dumps({"prompt": "the movie was", "chosen": " great.", "rejected": " dull."}),
        "",                                                                     # blank lines are skipped
        json.dumps({"prompt": "the plot", "chosen": " was superb.", "rejected": " felt weak."})])
    implicit = write_lines(tmp_path / "b.jsonl", [
        "\ufeff" + json.dumps({"chosen": "the movie was great.", "rejected": "the movie was dull."}) + "\r",
        "",
        json.dumps({"chosen": "the plot was superb.", "rejected": "the plot felt weak."})])
    a, b = reward_model.read_preferences(explicit), reward_model.read_preferences(implicit)
    assert a == [("the movie was", " great.", " dull.", 1), ("the plot", " was superb.", " felt weak.", 3)]
    assert b == [("the movie was ", "great.", "dull.", 1), ("the plot ", "was superb.", "felt weak.", 3)]
    enc = data.task_encoding()
    assert reward_model.tokenize(a, enc, 32) == reward_model.tokenize(b, enc, 32)  # the same texts, scored alike


BROKEN = {
    "no rejected": ([json.dumps({"prompt": "a", "chosen": " b"})], 1, 'no "rejected"'),
    "no chosen": (['{"chosen": "x", "rejected": "y"}', json.dumps({"rejected": "b"})], 2, 'no "chosen"'),
    "empty chosen": ([json.dumps({"prompt": "a", "chosen": "", "rejected": " b"})], 1, '"chosen" is empty'),
    "empty rejected": ([json.dumps({"chosen": "a b", "rejected": ""})], 1, '"rejected" is empty'),
    "identical": (['{"chosen": "x", "rejected": "y"}', "", json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"})],
                  3, '"chosen" and "rejected" are the same text'),
    "identical, implicit prompt": ([json.dumps({"chosen": "a b", "rejected": "a b"})], 1, "the same text"),
    "not a string": ([json.dumps({"prompt": "a", "chosen": 3, "rejected": " b"})], 1, '"chosen" is not a string: 3'),
    "not JSON": (['{"chosen": "x", "rejected": "y"}', '{"chosen": "x",'], 2, "not JSON"),
    "a list": (['["x", "y"]'], 1, "a JSON list, not an object"),
    "too long": (['{"chosen": "x", "rejected": "y"}', json.dumps({"prompt": "the movie was", "chosen": " great" * 40,
                                                                 "rejected": " dull."})],
                 2, "the pair has 43 tokens, more than the model's context of 32"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_preference_file_is_one_line_that_names_the_line(case, sft_dir, tmp_path):
    lines, line, message = BROKEN[case]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "no_sft"), str(tmp_path / "out"),
                                                     preferences=path))
    assert text.startswith(f"error: {path}:{line}: ") and message in text, text
    assert not os.path.exists(tmp_path / "no_sft") and not os.path.exists(tmp_path / "out")  # before any work


def test_text_that_is_not_utf8_is_refused_with_its_line_and_exit_status_1(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", ['{"chosen": "x", "rejected": "y"}'], b'\n{"chosen": "caf\xe9"}')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reward_model.py"), f"--preferences={path}",
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}:2: not UTF-8 text"), proc.stderr


def test_a_preference_file_trains_and_holds_out_a_share_of_its_pairs(sft_dir, tmp_path):
    good, bad = data.POSITIVE, data.NEGATIVE
    lines = [json.dumps({"prompt": f"the {s} was", "chosen": f" {good[i % 8]}.", "rejected": f" {bad[(i + 3) % 8]}."})
             for i, s in enumerate(data.SUBJECTS * 4)]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    metrics = reward_model.main(rm_args(sft_dir, str(tmp_path / "out"), preferences=path, epochs=2, lr=3e-3))
    assert metrics["pairs"] == 8 and set(metrics) == {"pairs", "accuracy", "seconds", "config"}  # no true reward
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_an_out_dir_that_holds_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(tmp_path)))
    assert "holds files that are not a reward model" in text and (tmp_path / "notes.txt").exists()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_init_with_its_own_tokenizer_saves_it_and_train_py_reads_the_same_scores(arch, tmp_path):
    """--init: a Hugging Face causal LM with a tokenizer of its own. The folder holds that tokenizer (padding on
    the right), and lab/hf.reward_model_fn, which tokenizes with it, reads the scores reward_model.py trained."""
    from test_models import save_checkpoint
    save_checkpoint(arch, tmp_path / "init")
    out = str(tmp_path / "rm")
    reward_model.main([f"--init={tmp_path / 'init'}", f"--out_dir={out}", "--pairs=40", "--epochs=1", "--lr=1e-2",
                       "--max_new_tokens=8", "--device=cpu"])
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = HFTokenizer(out)                                                      # the saved tokenizer
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == enc.tok.pad_token_id == enc.eot_token
    prompts, completions = ["the movie was", "the plot felt quite"], [" great.", " dull but the cast was superb."]
    with torch.no_grad():
        ours = reward_model.rewards(rm, [reward_model.encode(enc, p + c) for p, c in zip(prompts, completions)],
                                    enc.eot_token)
    theirs = reward_model_fn(out, data.task_encoding(), torch.device("cpu"))(prompts, completions)
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5) and ours[0] != ours[1]


def test_a_files_split_holds_out_a_share_of_its_distinct_pairs_and_no_training_pair(tmp_path, capsys):
    pairs = [("p", f" good {i % 7}", f" bad {i % 7}", i + 1) for i in range(20)]   # 7 distinct pairs, repeated
    torch.manual_seed(0)
    train_idx, test_idx = reward_model.split(pairs, 0.3)
    assert sorted(train_idx + test_idx) == list(range(20))
    held = {pairs[i][:3] for i in test_idx}
    assert len(held) == 2 and not held & {pairs[i][:3] for i in train_idx}
    distinct = [("p", f" good {i}", f" bad {i}", i + 1) for i in range(10)]
    train_idx, test_idx = reward_model.split(distinct, 0.2)
    assert len(test_idx) == 2 and sorted(train_idx + test_idx) == list(range(10))
    same = write_lines(tmp_path / "same.jsonl", [json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"})] * 6)
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(tmp_path / "out"), preferences=same))
    assert f"error: {same} holds 1 distinct pair in 6 lines: too few to hold out a share" == text
    assert not os.path.exists(tmp_path / "sft") and not os.path.exists(tmp_path / "out")   # before any work


# ----------------------------------------------------------------------------------------------
# nothing lost: out_dir replaced whole, only if it is a reward model, one run at a time

def folder(path, files):
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return {p.name: p.read_text() for p in path.iterdir()}


def test_a_folder_replaced_and_interrupted_at_any_moment_is_the_old_or_the_new_one_whole(tmp_path, monkeypatch):
    """lab/runs.replace_folder, stopped (Ctrl-C) while it writes, just before the swap, or after it: the folder is the
    earlier one or the new one, whole, and nothing else is left beside it. With the fallback of two renames too."""
    path = tmp_path / "rm"
    old = folder(path, {"config.json": "old", "metrics.json": "old", "tokenizer.json": "old"})
    new = {"config.json": "new", "metrics.json": "new"}
    def write(tmp, stop_after=None):
        os.makedirs(tmp)
        for i, (name, text) in enumerate(new.items()):
            if i == stop_after:
                raise KeyboardInterrupt
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    contents = lambda: {p.name: p.read_text() for p in path.iterdir()}  # noqa: E731
    for stop in (0, 1):                                                   # while writing
        with pytest.raises(KeyboardInterrupt):
            runs.replace_folder(str(path), lambda tmp: write(tmp, stop))
        assert contents() == old and os.listdir(tmp_path) == ["rm"]
    for swap in (runs.exchange, lambda a, b: False):                      # renameat2, or two renames
        monkeypatch.setattr(runs, "exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):                            # just before the swap
            runs.replace_folder(str(path), write)
        assert contents() == old and os.listdir(tmp_path) == ["rm"]
        monkeypatch.setattr(runs, "exchange", swap)
        runs.replace_folder(str(path), write)
        assert contents() == new and os.listdir(tmp_path) == ["rm"]
        folder(path, old)                                                 # the earlier model again
    renames = []
    real_replace = os.replace
    def replace_then_stop(a, b):                                          # the fallback, stopped between its renames
        renames.append((a, b))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)
    monkeypatch.setattr(runs, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        runs.replace_folder(str(path), write)
    monkeypatch.setattr(os, "replace", real_replace)
    assert contents() == old and os.listdir(tmp_path) == ["rm"]


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
from lab import runs
def write(tmp):
    os.makedirs(tmp)
    open(os.path.join(tmp, "config.json"), "w").write("new")
    if {when!r} == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
exchange = runs.exchange
def exchange_then_die(a, b):
    exchange(a, b)
    os.kill(os.getpid(), signal.SIGKILL)
if {when!r} == "swapped":
    runs.exchange = exchange_then_die
replace = os.replace
def replace_then_die(a, b):
    replace(a, b)
    if ".old" in b:
        os.kill(os.getpid(), signal.SIGKILL)
if {when!r} == "between renames":                      # where the system cannot swap two folders in one step
    runs.exchange = lambda a, b: False
    os.replace = replace_then_die
runs.replace_folder({path!r}, write)
"""


@pytest.mark.parametrize("when", ["writing", "swapped"])
def test_a_save_killed_leaves_one_model_whole_and_the_next_save_removes_what_it_left(tmp_path, when):
    """SIGKILL runs no clean-up: killed while it writes, the earlier model stays; killed just after the swap, the new
    one is there. Either way a temporary folder of the dead process is left, and the next save removes it."""
    path = tmp_path / "rm"
    folder(path, {"config.json": "old"})
    proc = subprocess.run([sys.executable, "-c", KILLED.format(root=ROOT, when=when, path=str(path))])
    assert proc.returncode == -9
    assert (path / "config.json").read_text() == ("old" if when == "writing" else "new")
    assert os.listdir(path) == ["config.json"] and len(os.listdir(tmp_path)) == 2       # rm and rm.tmpPID
    runs.replace_folder(str(path), lambda tmp: folder(__import__("pathlib").Path(tmp), {"config.json": "third"}))
    assert os.listdir(tmp_path) == ["rm"] and (path / "config.json").read_text() == "third"


def test_a_save_killed_between_its_two_renames_has_the_earlier_model_put_back(tmp_path):
    """Without a swap in one step, a save renames the earlier model to rm.oldPID, then the new one to rm; SIGKILL
    between the two leaves no rm at all. The next save's clean-up puts the earlier model back at rm (it is whole, and
    it is what rm held) and removes the dead process's temporaries."""
    path = tmp_path / "rm"
    folder(path, {"config.json": "old"})
    proc = subprocess.run([sys.executable, "-c", KILLED.format(root=ROOT, when="between renames", path=str(path))])
    assert proc.returncode == -9 and not path.exists() and len(os.listdir(tmp_path)) == 2   # rm.oldPID and rm.tmpPID
    runs.remove_stale(str(path))
    assert os.listdir(tmp_path) == ["rm"] and (path / "config.json").read_text() == "old"


def test_a_save_leaves_no_file_of_the_earlier_model(tmp_path):
    """save() into one out_dir: first a model with a Hugging Face tokenizer of its own, then one with the task's
    tokenizer (tiktoken's, of which no file is saved). The folder then holds the second model's files alone: a
    tokenizer left by the first would be the one that train.py reads the second model's scores with."""
    from test_models import save_checkpoint
    lm, tok = save_checkpoint("gpt2", tmp_path / "init")
    cfg = reward_model.Config(out_dir=str(tmp_path / "rm"))
    metrics = {"loss": 0.5, "config": vars(cfg)}
    reward_model.save(cfg, reward_model.reward_model_from(lm, tok.eos_token_id), HFTokenizer(str(tmp_path / "init")),
                      metrics)
    assert "tokenizer_config.json" in os.listdir(cfg.out_dir)
    enc = data.task_encoding()
    task_lm = GPT2LMHeadModel(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    reward_model.save(cfg, reward_model.reward_model_from(task_lm, enc.eot_token), enc, metrics)
    assert sorted(os.listdir(cfg.out_dir)) == ["config.json", "metrics.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["init", "rm"]                  # and no temporary folder beside it


def test_a_folder_that_is_not_this_scripts_reward_model_is_never_replaced(trained, tmp_path):
    _, out = trained
    assert reward_model.is_reward_model(out) and reward_model.is_reward_model(str(tmp_path / "none"))
    other = {"metrics.json": json.dumps({"loss": 0.5, "config": {"lr": 1}}), "results.csv": "a,b\n", "notes.txt": "mine"}
    for files in (other, {"metrics.json": other["metrics.json"]}, {"notes.txt": "mine"}):
        target = tmp_path / f"out{len(files)}"
        before = folder(target, files)
        assert not reward_model.is_reward_model(str(target))
        text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(target)))
        assert "holds files that are not a reward model" in text and str(target) in text
        assert {p.name: p.read_text() for p in target.iterdir()} == before
    mixed = tmp_path / "mixed"
    folder(mixed, {name: open(os.path.join(out, name), "rb").read().decode("latin-1") for name in os.listdir(out)})
    (mixed / "notes.txt").write_text("mine")                              # a reward model, and a file of yours
    assert not reward_model.is_reward_model(str(mixed))


def test_two_runs_on_one_out_dir_are_stopped_at_a_lock(tmp_path):
    out = tmp_path / "rm"
    with runs.exclusive(str(out)):                                        # a run of reward_model.py or train.py in it
        text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(out)))
    assert text == f"error: another run is using {out}: wait for it to end, or choose another --out_dir"
    assert not os.path.exists(tmp_path / "sft")


@pytest.mark.parametrize("flags, message", [
    (dict(lr=1e6), "lr must be in [0, 0.1]"),
    (dict(sft_steps=0), "sft_steps must be > 0"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(threads=10 ** 9), "threads must be in [0, "),
    (dict(pairs=2, held_out=0.9), "held_out must be small enough that a pair is left to train on: 2 of --pairs=2"),
    (dict(n_embd=30, n_head=4), "n_embd must be > 0 and divisible by n_head=4"),
    (dict(preferences="missing.jsonl"), "--preferences=missing.jsonl does not exist"),
])
def test_nonsense_is_refused_before_any_work_in_one_line_naming_it(tmp_path, flags, message):
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(tmp_path / "out"), **flags))
    assert text.startswith("error: ") and message in text, text
    assert not os.path.exists(tmp_path / "sft") and not os.path.exists(tmp_path / "out")


def test_an_out_dir_that_is_a_file_or_under_one_is_named_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(tmp_path / "file")))
    assert text == f"error: out_dir {tmp_path / 'file'} is a file, not a folder: give a new or empty folder"
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), str(tmp_path / "file" / "rm")))
    assert text == f"error: out_dir {tmp_path / 'file' / 'rm'} cannot be written: {tmp_path / 'file'} is a file"
    assert not os.path.exists(tmp_path / "sft")


def test_a_resume_after_the_reward_model_changed_is_refused(sft_dir, tmp_path):
    """The checkpoint keeps what identifies the reward model's folder: a resume against the same model continues, one
    against a model trained again into the same folder would change the reward mid-run, and is refused."""
    from transformers import GPT2ForSequenceClassification
    enc = data.task_encoding()
    def save_reward_model(seed):
        torch.manual_seed(seed)
        GPT2ForSequenceClassification(GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                                 num_labels=1, pad_token_id=enc.eot_token)).save_pretrained(tmp_path / "rm")
    save_reward_model(0)
    args = dict(reward_model=str(tmp_path / "rm"), gold_fn="data:sentiment_reward", ckpt_every=1)
    train.main(tiny_args(sft_dir, tmp_path / "run", iters=2, **args))
    train.main(tiny_args(sft_dir, tmp_path / "run", iters=3, resume=1, **args))         # the same model: it continues
    save_reward_model(1)
    text = one_line_error(train.main, tiny_args(sft_dir, tmp_path / "run", iters=4, resume=1, **args))
    assert text.startswith(f"error: --resume would mix two rewards: the reward model {tmp_path / 'rm'} changed"), text


def test_messages_name_the_gold_function_and_both_sizes_of_a_vocabulary_too_small(tmp_path):
    text = one_line_error(train.main, tiny_args(str(tmp_path / "sft"), tmp_path / "run", gold_fn="no_such_module:f"))
    assert text == "error: gold function 'no_such_module:f' not found: no module 'no_such_module' (expected 'module:function')"
    from transformers import GPT2ForSequenceClassification
    enc = data.task_encoding()
    GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                             num_labels=1, pad_token_id=0)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=f"reward model {tmp_path / 'small'} has 100 token embeddings, but the "
                                         f"tokenizer it reads with \\({enc.name}\\) has {enc.n_vocab} tokens"):
        reward_model_fn(str(tmp_path / "small"), enc, torch.device("cpu"))


def test_a_read_only_out_dir_is_named_before_any_work(tmp_path, monkeypatch):
    """(As root every folder is writable, so the system's answer is replaced by a read-only one here.)"""
    parent = str(tmp_path / "ro")
    os.makedirs(parent)
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != parent)
    text = one_line_error(reward_model.main, rm_args(str(tmp_path / "sft"), os.path.join(parent, "rm")))
    assert text == f"error: out_dir {os.path.join(parent, 'rm')} cannot be written: {parent} is read-only"
    assert not os.path.exists(tmp_path / "sft") and os.listdir(parent) == []


def test_a_file_that_repeats_pairs_says_so_before_any_work(tmp_path, monkeypatch, capsys):
    lines = [json.dumps({"prompt": "a", "chosen": f" b{i % 3}", "rejected": " c"}) for i in range(7)]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    monkeypatch.setattr(reward_model, "load_pi_init", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        reward_model.train(reward_model.Config(**TINY, preferences=path, out_dir=str(tmp_path / "out")))
    assert capsys.readouterr().out == (f"warning: {path}: 4 of 7 lines repeat an earlier pair; each pair is held out "
                                       "or trained on with all its copies\n")
