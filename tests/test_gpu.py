"""
The GPU path, where CUDA is present (skipped elsewhere): a bf16 run that trains and starts at ratio 1, data
parallel over NCCL with one process, peak GPU memory in the log. The rest of the suite pins device=cpu, so
that its numbers are the CPU's on any machine. tools/gpu_check.sh runs these with the paper's model shapes.
Run: python -m pytest -q tests/test_gpu.py
"""
import os
import subprocess
import sys

import pytest
import torch

import train
from test_models import run_args, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bf16_run_on_the_gpu_trains_and_starts_at_ratio_one(tmp_path, capsys):
    init, out = tmp_path / "init", tmp_path / "out"
    save_checkpoint("gpt_neox", init)                                # a padded vocabulary, as Pythia's
    history = train.main(run_args(init, out, "--device=cuda", "--iters=3"))  # precision auto: bf16 on cuda
    assert "device cuda" in capsys.readouterr().out
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
