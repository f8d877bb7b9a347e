"""
Tests of experiments/bench.py: its flags are checked and every failure is one line `error: ...`; one very small
measurement of the tiny model (a few seconds); its ids tokenizer; the three samplers it times draw the same tokens
from the same prompts; the RL iteration samples with the sampler chosen; and, on a clock whose readings are known,
each printed figure is its definition (tokens per second of the batch, medians after the untimed first iteration, the
matrix-product peak, the update's TFLOP/s, the reward model's ratio). Run: pytest -q tests/test_bench.py
"""
import time

import pytest
import torch

import model
import train
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


def test_the_ids_tokenizer_reads_back_what_it_writes():
    """The benchmark's texts are token ids separated by spaces: encoding a decoded list gives the ids back, and the
    benchmark's reward counts a completion's tokens."""
    enc = bench.IdsTokenizer(303)
    ids = [0, 17, 302, 5, 5]
    assert enc.decode(ids) == "0 17 302 5 5" and enc.encode_ordinary(enc.decode(ids)) == ids
    assert enc.encode_ordinary(enc.decode([])) == []
    assert bench.length_reward(["1 2"], [enc.decode(ids)]) == [5 / 32]


def test_the_three_samplers_draw_the_same_tokens_from_the_same_prompts(monkeypatch):
    """time_samplers compares like with like: the static sampler, the eager loop and transformers' generate get the
    same prompts, and each samples at temperature 1 from the whole vocabulary and stops at end-of-text. Then under one
    seed the three draw the same tokens: the static sampler draws the eager loop's random numbers in the same order,
    and both draw as torch.multinomial draws, as transformers' generate does. Here each sampler is seeded before every
    call and records what it drew; a bias toward end-of-text makes the rows end at different steps."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    lm = bench.make_model("tiny", device).eval()
    enc = bench.IdsTokenizer(lm.config.vocab_size)
    with torch.no_grad():                                 # the final layer norm's bias adds 3 to end-of-text's logit
        eot = lm.transformer.wte.weight[enc.eot_token]
        lm.transformer.ln_f.bias.copy_(3 * eot / eot.norm() ** 2)
    drawn = {}

    def seeded(name, sampler, response):
        def draw(*args, **kwargs):
            torch.manual_seed(1)
            out = sampler(*args, **kwargs)
            drawn.setdefault(name, []).append(response(out, kwargs))
            return out
        return draw
    monkeypatch.setattr(bench, "generate_static", seeded("static", bench.generate_static, lambda out, kw: out[0]))
    monkeypatch.setattr(bench.model, "generate", seeded("eager", bench.model.generate, lambda out, kw: out[0]))
    monkeypatch.setattr(lm, "generate", seeded("theirs", lm.generate,
                                               lambda out, kw: out.sequences[:, kw["input_ids"].shape[1]:]))
    args = bench.Bench(batch_size=6, prompt_len=6, max_new_tokens=10, rounds=2)
    bench.time_samplers(args, train.resolve(train.Config(device="cpu")), lm, enc, device)
    response = drawn["eager"][0]                                          # (6, T)
    ended = (response == enc.eot_token).any(1)
    assert response.shape == (6, 10) and 0 < ended.sum() < 6              # some rows end early, some never
    for name in ("static", "eager", "theirs"):
        assert len(drawn[name]) == 3                                      # the warm-up, then one call a round
        for r in drawn[name]:
            assert torch.equal(r, response), name


def tiny_iterations(iters):
    """(model, config, what bench.time_iterations returns) for the tiny model, iters iterations of 2 responses of at
    most 2 tokens after prompts of at most 4, one epoch of minibatches of 1."""
    device = torch.device("cpu")
    lm = bench.make_model("tiny", device).eval()
    cfg = train.resolve(train.Config(batch_size=2, minibatch_size=1, epochs=1, max_new_tokens=2, device="cpu",
                                     target_kl=0.0))
    args = bench.Bench(batch_size=2, prompt_len=4, max_new_tokens=2, iters=iters)
    return lm, cfg, bench.time_iterations(args, cfg, lm, bench.IdsTokenizer(lm.config.vocab_size), device)


def test_the_rl_iteration_samples_with_the_chosen_sampler_and_times_it_as_generation(monkeypatch):
    """time_iterations samples with the sampler that train.py chooses (choose_sampler), and the seconds spent in it
    are the generation's. The sampler here sleeps 0.5 s before it samples: generation takes at least that, while the
    scoring forwards and the update of the tiny model, each timed apart, take some time too."""
    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)
        return model.generate(*args, **kwargs)
    monkeypatch.setattr(bench, "choose_sampler", lambda cfg, device: slow)
    _, _, (gen, score, update, flops) = tiny_iterations(2)
    assert len(calls) == 2 + 1                                            # one untimed iteration, then 2
    assert 0.5 <= gen and 0 < score < gen and 0 < update and flops > 0    # no upper bound: the load varies


class Clock:
    """A clock for bench.py whose readings are known: the k-th reading is k cubed seconds, so that each interval it
    times has a length of its own, and a median of growing lengths differs from their mean."""
    def __init__(self):
        self.k = 0

    def perf_counter(self):
        self.k += 1
        return float(self.k ** 3)

    def time(self):
        return 0.0


def seconds(i):
    """On the Clock, the length of the i-th measurement (from 0) that reads it twice: readings 2i + 1 and 2i + 2."""
    return (2 * i + 2) ** 3 - (2 * i + 1) ** 3


def test_the_samplers_rates_are_tokens_of_the_batch_per_second_and_the_prompts_as_long_as_asked(monkeypatch):
    """time_samplers on a clock of known readings: each measurement reads it twice, so the i-th (0: the first warm-up)
    lasts seconds(i); a rate is batch x response tokens / those seconds, and the ratios are those of the rates. The
    prompts are prompt_len // 2 to prompt_len tokens long. End-of-text is made unlikely (its logit lowered by 100),
    so that every response has max_new_tokens tokens."""
    monkeypatch.setattr(bench, "time", Clock())
    device = torch.device("cpu")
    torch.manual_seed(0)
    lm = bench.make_model("tiny", device).eval()
    enc = bench.IdsTokenizer(lm.config.vocab_size)
    with torch.no_grad():
        eot = lm.transformer.wte.weight[enc.eot_token]
        lm.transformer.ln_f.bias.copy_(-100 * eot / eot.norm() ** 2)
    lengths = []
    left_pad = model.left_pad
    monkeypatch.setattr(bench.model, "left_pad", lambda prompts, *a: lengths.extend(map(len, prompts)) or
                        left_pad(prompts, *a))
    args = bench.Bench(batch_size=16, prompt_len=6, max_new_tokens=5, rounds=1)
    static, eager, theirs, static_ratio, eager_ratio = bench.time_samplers(
        args, train.resolve(train.Config(device="cpu")), lm, enc, device)
    tokens = 16 * 5                                                     # the round after 3 warm-ups: i = 3, 4, 5
    assert [static, eager, theirs] == pytest.approx([tokens / seconds(3), tokens / seconds(4), tokens / seconds(5)])
    assert [static_ratio, eager_ratio] == pytest.approx([seconds(5) / seconds(3), seconds(5) / seconds(4)])
    assert len(lengths) == 16 and min(lengths) >= 3 and max(lengths) == 6


def test_the_iterations_times_are_the_medians_after_the_untimed_first_and_their_tflops_the_updates(monkeypatch):
    """time_iterations on a clock of known readings: each iteration reads it 5 times (its start, the sampler's start
    and end, the update's start and end), so its generation, scoring (the rest of the rollout) and update seconds
    are known; the figures are the medians over the iterations after the untimed first. The matrix-product peak is
    2 n^3 FLOPs a product, 10 products; measure's TFLOP/s and share of the peak are the update's FLOPs over its
    seconds."""
    clock = Clock()
    monkeypatch.setattr(bench, "time", clock)
    lm, cfg, (gen, score, update, flops) = tiny_iterations(3)
    c = [(5 * it + j) ** 3 for it in range(4) for j in range(1, 6)]     # the readings, by iteration
    rows = [(c[5 * it + 2] - c[5 * it + 1], c[5 * it + 3] - c[5 * it] - (c[5 * it + 2] - c[5 * it + 1]),
             c[5 * it + 4] - c[5 * it + 3]) for it in range(4)]
    assert [gen, score, update] == list(rows[2]) and flops > 0          # each grows: the median is iteration 2's
    clock.k = 0
    assert bench.matmul_peak(cfg, torch.device("cpu")) == pytest.approx(2 * 1024 ** 3 * 10 / seconds(0) / 1e12)
    monkeypatch.setattr(bench, "time_samplers", lambda *a: (100.0, 50.0, 25.0, 4.0, 2.0))
    monkeypatch.setattr(bench, "time_iterations", lambda *a: (1.0, 2.0, 4.0, 8e12))
    monkeypatch.setattr(bench, "matmul_peak", lambda *a: 10.0)
    line = bench.measure(bench.Bench(models="tiny", device="cpu", rounds=1))[2]
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    assert line.startswith(f"| tiny | {params:.2f}M | 100 | 50 | 25 | 4.00x | 2.00x | 1.000 | 2.000 | 4.000 | 2 | 20% | ")


def test_the_reward_models_ratio_is_its_seconds_over_the_rules_after_the_untimed_round(monkeypatch, tmp_path, capsys):
    """time_reward_model on a clock of known readings, with a one-layer pi_init: its j-th iteration (from 0, the
    untimed round's two included) lasts seconds(j), and the rounds alternate which reward goes first (reward model,
    rule; rule, reward model; ...). The ratio is the median over the rounds after the first of the reward model's
    seconds over the rule's."""
    from lab import runs
    monkeypatch.setattr(bench, "time", Clock())
    enc = bench.data.task_encoding()
    tiny = model.tiny_gpt(train.Config(n_layer=1, n_head=2, n_embd=32), enc.n_vocab)
    monkeypatch.setattr(runs, "load_pi_init", lambda *a: tiny)
    ratio = bench.time_reward_model(bench.Bench(reward_model=True, rounds=3, device="cpu", sft_dir=str(tmp_path)))
    # j: round 0 (untimed) reward model 0, rule 1; round 1 rule 2, reward model 3; round 2 reward model 4, rule 5;
    # round 3 rule 6, reward model 7
    ratios = [seconds(3) / seconds(2), seconds(4) / seconds(5), seconds(7) / seconds(6)]
    assert ratio == pytest.approx(sorted(ratios)[1]) and sorted(ratios)[1] != pytest.approx(sum(ratios) / 3)
    assert f"| ratio {sorted(ratios)[1]:.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})" in capsys.readouterr().out


def test_the_tiny_model_measured_is_train_pys():
    """The benchmark's tiny model is the network of train.py's default config over the task's vocabulary: the figures
    it prints are those of the model that `python train.py` trains."""
    import data
    lm = bench.make_model("tiny", torch.device("cpu"))
    assert lm.config.to_dict() == model.tiny_gpt_config(train.Config(), data.task_encoding().n_vocab).to_dict()
