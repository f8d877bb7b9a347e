"""
The GPU path, where CUDA is present (skipped elsewhere): a bf16 run that trains and starts at ratio 1, data
parallel over NCCL with one process, peak GPU memory in the log, and the sampler's CUDA graph: log-probs of a
full forward pass, fresh draws from the model's distribution at every replay, the weights of now and not of the
capture. The rest of the suite pins device=cpu, so that its numbers are the CPU's on any machine.
tools/gpu_check.sh runs these with the paper's model shapes.
Run: python -m pytest -q tests/test_gpu.py
"""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

import model
import train
from lab import static_sampler
from test_models import ARCHS, full_forward_logprobs, likely_eot, run_args, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cuda_graph", [0, 1])
def test_bf16_run_on_the_gpu_trains_and_starts_at_ratio_one(cuda_graph, tmp_path, capsys):
    init, out = tmp_path / "init", tmp_path / "out"
    save_checkpoint("gpt_neox", init)                                # a padded vocabulary, as Pythia's
    static_sampler.DECODERS.clear()
    history = train.main(run_args(init, out, "--device=cuda", "--iters=3", f"--cuda_graph={cuda_graph}"))  # bf16
    assert "device cuda" in capsys.readouterr().out
    assert any(dec.graph is not None for dec in static_sampler.DECODERS.values()) == bool(cuda_graph)  # the graph
    assert history[0]["kl"] == 0 and history[0]["approx_kl"] < 1e-6 and history[0]["clipfrac"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for row in history for v in row.values())
    params_mb = sum(p.numel() for p in torch.load(out / "ckpt.pt", weights_only=False)["policy"].values()) * 4 / 2**20
    assert all(params_mb < row["mem_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20 for row in history)


def test_torchrun_with_one_process_over_nccl(tmp_path):
    init = tmp_path / "init"
    save_checkpoint("gpt2", init)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
           *run_args(init, tmp_path / "out", "--device=cuda", "--iters=2")]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))   # the reward function lives in the tests
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "device cuda:0 x 1 processes" in proc.stdout and proc.stdout.count("iter ") == 2


def test_by_default_the_run_samples_with_the_eager_loop(tmp_path):
    """The CUDA graph is opt-in (--cuda_graph=1) until a GPU has run it; the default draws with model.generate."""
    init = tmp_path / "init"
    save_checkpoint("gpt2", init)
    static_sampler.DECODERS.clear()
    train.main(run_args(init, tmp_path / "out", "--device=cuda"))
    assert not static_sampler.DECODERS


def prompts_of(tok, rows):
    texts = ["the plot", "the music was very", "the", "the acting felt quite dull and"]
    ids, mask = model.left_pad([tok.encode(t) for t in texts] * (rows // 4), tok.eos_token_id, torch.device("cuda"))
    return ids, mask                                                 # (rows, P) left padding


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_sampler_logprobs_equal_a_full_forward_pass(arch, tmp_path):
    """fp32: a first call captures 8 steps as a graph, a second replays it for every 8 tokens; both return the
    log-probs of a full forward pass, one decoder serves both, and with end-of-text likely the rows end early, as
    in generate."""
    lm, tok = save_checkpoint(arch, tmp_path)
    n_vocab, eot = len(tok), tok.eos_token_id
    ids, mask = prompts_of(tok, 16)
    for lm, T in ((lm.cuda(), 12), (likely_eot(copy.deepcopy(lm), eot).cuda(), 40)):
        static_sampler.DECODERS.clear()
        for _ in range(2):
            response, resp_mask, logprobs = static_sampler.generate_static(lm, ids, mask, T, eot, n_vocab, graph=True)
            assert response.max() < n_vocab and (response.shape[1] == T) == (T == 12)
            torch.testing.assert_close(logprobs, full_forward_logprobs(lm, ids, mask, response, resp_mask, n_vocab),
                                       atol=1e-4, rtol=1e-4)
        assert len(static_sampler.DECODERS) == 1 and next(iter(static_sampler.DECODERS.values())).graph is not None


def test_cuda_graph_replays_draw_fresh_tokens_from_the_models_distribution(tmp_path):
    """8192 rows of one prompt; in a call that replays every step, the first tokens' frequencies against the
    model's next-token probabilities (its LM head sharpened: entropy about 2.6 nats, a largest probability
    about 0.2, so that an argmax or a uniform draw would be far off), and two calls draw different tokens."""
    lm, tok = save_checkpoint("llama", tmp_path)                      # its LM head is not tied to the embedding
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(50)
    lm, n_vocab, eot = lm.cuda(), len(tok), tok.eos_token_id
    ids = torch.tensor([tok.encode("the plot")] * 8192, device="cuda")
    mask = torch.ones_like(ids)
    static_sampler.DECODERS.clear()
    calls = [static_sampler.generate_static(lm, ids, mask, 2, eot, n_vocab, graph=True)[0] for _ in range(3)]  # capture, replays
    with torch.no_grad():
        probs = torch.softmax(lm(input_ids=ids[:1]).logits[0, -1, :n_vocab].double(), -1)  # (V,)
    freq = torch.bincount(calls[1][:, 0], minlength=n_vocab).double() / len(ids)
    noise = 0.5 * (2 * probs * (1 - probs) / (math.pi * len(ids))).sqrt().sum()  # expected total variation
    assert (freq - probs).abs().sum() / 2 < 3 * noise
    assert not torch.equal(calls[1], calls[2])


def test_cuda_graph_samples_with_the_weights_of_now_in_bf16(tmp_path):
    """bf16 autocast, weights that train (autocast would cache their bf16 copies): after an in-place change of
    the weights, as an optimizer step makes, the replayed graph's log-probs are the new weights' full forward
    pass (to bf16 rounding), far from the old weights'."""
    lm, tok = save_checkpoint("gpt_neox", tmp_path)
    lm, n_vocab, eot = lm.cuda().requires_grad_(True), len(tok), tok.eos_token_id
    ids, mask = prompts_of(tok, 16)
    cfg = train.Config(precision="bf16")
    static_sampler.DECODERS.clear()
    with model.autocast(cfg, ids.device):                             # a rollout's block, as model.sample opens it
        static_sampler.generate_static(lm, ids, mask, 12, eot, n_vocab, graph=True)  # captured with the old weights
    old = copy.deepcopy(lm)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(5)                     # an optimizer step, between two rollouts
    with model.autocast(cfg, ids.device):
        response, resp_mask, logprobs = static_sampler.generate_static(lm, ids, mask, 12, eot, n_vocab, graph=True)
        new_err = (logprobs - full_forward_logprobs(lm, ids, mask, response, resp_mask, n_vocab)).abs().max()
        old_err = (logprobs - full_forward_logprobs(old, ids, mask, response, resp_mask, n_vocab)).abs().max()
    assert len(static_sampler.DECODERS) == 1                                   # the same graph, replayed
    assert new_err < 0.05 and old_err > 10 * new_err
