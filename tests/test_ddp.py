"""
Data-parallel training (torchrun, DistributedDataParallel) is exactly the one-process algorithm.
Two CPU processes with the gloo backend: one update's gradient over a batch split across them equals
the one-process gradient over the whole batch, the rollout's whitening and logged statistics are
global, and `torchrun --nproc_per_node=2 train.py` trains, checkpoints and resumes after a kill.
Run: pytest -q tests/test_ddp.py
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model  # noqa: E402
import ppo  # noqa: E402
import train  # noqa: E402
from lab import ddp  # noqa: E402
from ppo import masked_mean, masked_whiten  # noqa: E402

LENGTHS = [6, 5, 1, 3]   # real tokens of the 4 responses: rank 0 holds rows 0-1 (11 tokens), rank 1 rows 2-3 (4)


def tiny_policy(vocab):
    torch.manual_seed(0)                                             # the same weights in every process
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    return model.PolicyWithValue(lm).eval()                          # a random value head: values != 0


def fixed_batch(policy):
    """4 responses of T = 6 tokens after P = 3 prompt tokens (one prompt left-padded), with old log-probs
    on both sides of PPO's clip range, raw advantages of non-zero mean, and garbage on the padding."""
    g = torch.Generator().manual_seed(1)
    B, P, T, V = 4, 3, 6, policy.lm.config.vocab_size
    input_ids = torch.randint(V, (B, P + T), generator=g)           # (B, P + T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 0] = 0
    response = input_ids[:, P:]                                      # (B, T)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).float()  # (B, T)
    with torch.no_grad():
        logits, _ = policy(input_ids, attention_mask, P)
    logprobs = model.token_logprobs(logits, response) + 0.3 * torch.randn(B, T, generator=g)  # (B, T) pi_old
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 logprobs=logprobs, ref_logprobs=logprobs - 0.5 * torch.rand(B, T, generator=g),
                 values=torch.randn(B, T, generator=g), advantages=2 * torch.randn(B, T, generator=g) + 1,
                 returns=torch.randn(B, T, generator=g))
    return batch, P


def one_update(algo, policy, batch, P, mean_fn):
    """The gradient of one update over the whole (local) batch: lr 0, no clipping of the gradient."""
    cfg = train.resolve(train.Config(algo=algo, batch_size=4, minibatch_size=4, epochs=1, max_grad_norm=1e9))
    if algo == "ppo":                                                # whitened as rollout whitens
        batch = dict(batch, advantages=masked_whiten(batch["advantages"], batch["mask"], mean_fn=mean_fn))
    if algo == "grpo":                                               # as lora.make_policy: no value head to train
        policy.v_head.requires_grad_(False)
    wrapped = torch.nn.parallel.DistributedDataParallel(policy) if dist.is_initialized() else policy
    stats = train.update(cfg, wrapped, torch.optim.SGD(policy.parameters(), lr=0.0), batch, P)
    return [p.grad.clone() for p in policy.parameters() if p.requires_grad], stats


def length_reward(prompts, completions):
    return [len(c) % 7 / 7 for c in completions]


def recording_reward(prompts, completions):
    """The task's reward; each process also writes what it sampled to $APA_TEST_RECORD.<rank>, a line a batch."""
    with open(f"{os.environ['APA_TEST_RECORD']}.{os.environ['RANK']}", "a") as f:
        f.write(json.dumps(list(zip(prompts, completions))) + "\n")
    return data.sentiment_reward(prompts, completions)


def approx_kls(policy, batch, P):
    """approx_kl of the fixed batch at lr 0: over rows 0-1 (rank 0's), rows 2-3 (rank 1's), and all four."""
    with torch.no_grad():
        logits, _ = policy(batch["input_ids"], batch["attention_mask"], P)
    logprobs = model.token_logprobs(logits, batch["response"])
    return [ppo.approx_kl(logprobs[rows], batch["logprobs"][rows], batch["mask"][rows])
            for rows in (slice(0, 2), slice(2, 4), slice(0, 4))]


def worker(rank, tmp, target_kl):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a collective one process skips: an error, no hang
    torch.set_num_threads(1)
    result = {}
    for algo in ("apa", "ppo", "grpo"):                              # this rank's half of the fixed batch
        policy = tiny_policy(11)
        batch, P = fixed_batch(policy)
        rows = slice(2 * rank, 2 * rank + 2)
        result[algo] = one_update(algo, policy, {k: v[rows] for k, v in batch.items()}, P, ddp.global_mean)
    # a rollout of this rank's 4 responses (its own random stream), pi_init another network: a KL of its own
    enc = data.task_encoding()
    policy = tiny_policy(enc.n_vocab)
    ref_lm = tiny_policy(enc.n_vocab).lm
    with torch.no_grad():
        ref_lm.lm_head.weight.mul_(0.5)
    prompts = data.task_prompts()
    cfg = train.resolve(train.Config(algo="ppo", batch_size=8, max_new_tokens=6))
    torch.manual_seed(rank)
    batch, _, stats, samples = train.rollout(cfg, policy, ref_lm, [enc.encode_ordinary(p) for p in prompts],
                                             prompts, length_reward,
                                             train.make_sampler(cfg, enc, torch.device("cpu")))
    result["rollout"] = dict(advantages=batch["advantages"], mask=batch["mask"], stats=stats, samples=samples)
    # the KL guard on the global approx_kl: target_kl lies between this rank's and the other's, so a guard that
    # looked at its own would stop one process and not the other, whose next step would wait for it
    policy = tiny_policy(11)
    batch, P = fixed_batch(policy)
    cfg = train.resolve(train.Config(algo="apa", batch_size=4, minibatch_size=4, epochs=2, target_kl=target_kl))
    rows = slice(2 * rank, 2 * rank + 2)
    result["guard"] = train.update(cfg, torch.nn.parallel.DistributedDataParallel(policy),
                                   torch.optim.SGD(policy.parameters(), lr=0.0), {k: v[rows] for k, v in batch.items()}, P)
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_compute_the_one_process_update_and_global_statistics(tmp_path):
    policy = tiny_policy(11)
    kl_0, kl_1, kl_all = approx_kls(policy, *fixed_batch(policy))      # the approx_kl of each rank's rows, of all
    assert min(kl_0, kl_1) < kl_all - 1e-3                              # they differ: the guard can tell them apart
    target_kl = (min(kl_0, kl_1) + kl_all) / 2                          # the global one is past it, one rank's not
    mp.spawn(worker, args=(str(tmp_path), target_kl), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in range(2):                                                 # both stop before the first step, on the
        guard = ranks[r]["guard"]                                       # approx_kl of all processes' tokens
        assert guard["steps"] == 0 and guard["kl_stop"] == pytest.approx(kl_all, rel=1e-5)
    for algo in ("apa", "ppo", "grpo"):                              # GRPO: its k3 term a global token mean too
        policy = tiny_policy(11)
        grads, stats = one_update(algo, policy, *fixed_batch(policy), masked_mean)  # one process, all rows
        for r in range(2):                                           # DDP: the same gradient in both processes
            for g, g_r in zip(grads, ranks[r][algo][0]):
                torch.testing.assert_close(g_r, g, rtol=1e-4, atol=1e-6)
            assert ranks[r][algo][1].keys() == stats.keys()
            for k in stats:                                          # logged losses, approx_kl, clip fractions
                assert ranks[r][algo][1][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), (algo, k)
    # the rollout: advantages whitened over both processes' tokens, statistics over both processes' samples
    rollouts = [r["rollout"] for r in ranks]
    width = max(r["mask"].shape[1] for r in rollouts)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    adv, mask = (torch.cat([pad(r[k]) for r in rollouts]) for k in ("advantages", "mask"))  # (8, T)
    assert abs(masked_mean(adv, mask)) < 1e-5 and abs(masked_mean(adv ** 2, mask) - 1) < 1e-4
    assert max(abs(masked_mean(r["advantages"], r["mask"])) for r in rollouts) > 0.05  # not per-rank whitening
    samples = rollouts[0]["samples"] + rollouts[1]["samples"]
    expected = {"reward": sum(s[2] for s in samples) / 8, "kl": sum(s[3] for s in samples) / 8,
                "length": mask.sum().item() / 8, "distinct2": data.distinct_n([s[1] for s in samples], 2)}
    expected["J"] = expected["reward"] - train.Config.lam * expected["kl"]
    assert rollouts[0]["samples"] != rollouts[1]["samples"]          # each rank its own random stream
    assert abs(sum(s[3] for s in rollouts[0]["samples"]) - sum(s[3] for s in rollouts[1]["samples"])) > 1e-2  # KL too
    for r in rollouts:
        assert r["stats"] == rollouts[0]["stats"]                    # the same global numbers in both processes
        for k, v in expected.items():
            assert abs(r["stats"][k] - v) < 1e-6, k


# ----------------------------------------------------------------------------------------------
# end to end: torchrun with 2 processes

def torchrun(out_dir, sft_dir, *extra, record=""):
    args = dict(device="cpu", n_layer=1, n_head=2, n_embd=32, block_size=32, sft_steps=150, sft_lr=3e-3, iters=6,
                batch_size=16, minibatch_size=8, epochs=2, lr=1e-3, jstar_samples=0, sample_every=0, ckpt_every=2, eval_every=0,
                seed=3, sft_dir=sft_dir, out_dir=out_dir, reward_fn="test_ddp:recording_reward")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *(f"--{k}={v}" for k, v in args.items()), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "tests"),
               APA_TEST_RECORD=record or os.path.join(out_dir + ".record"))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("ms", "mem_mb")} for line in f]  # no timings


def test_torchrun_trains_checkpoints_and_resumes_after_a_kill(tmp_path):
    sft, straight, killed = (str(tmp_path / d) for d in ("sft", "straight", "killed"))
    proc = torchrun(straight, sft, record=str(tmp_path / "sampled"))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    # each process samples its share of every batch from its own random stream, and steps through its share
    # of every minibatch: as many optimizer steps as in one process
    sampled = [[json.loads(line) for line in open(tmp_path / f"sampled.{r}")] for r in range(2)]
    assert [len(batch) for r in range(2) for batch in sampled[r]] == [16 // 2] * 12
    assert all(a != b for a, b in zip(*sampled))
    assert [row["steps"] for row in read_metrics(straight)] == [2 * 16 // 8] * 6
    assert [row["samples"] for row in read_metrics(straight)] == [16 * i for i in range(1, 7)]  # of all processes
    assert [line.split("/")[0] for line in out.splitlines() if line.startswith("iter ")] == \
        [f"iter {i}" for i in range(1, 7)]                           # rank 0 alone prints
    assert "x 2 processes" in out
    assert sorted(os.listdir(straight)) == ["ckpt.pt", "config.json", "metrics.jsonl", "policy"]  # one of each
    assert len(torch.load(os.path.join(straight, "ckpt.pt"), weights_only=False)["ranks_rng"]) == 2
    init = GPT2LMHeadModel.from_pretrained(os.path.join(sft, os.listdir(sft)[0])).state_dict()
    trained = GPT2LMHeadModel.from_pretrained(os.path.join(straight, "policy")).state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # it trained

    proc = torchrun(killed, sft)
    for line in proc.stdout:                                         # kill every process after iteration 3,
        if line.startswith("iter 3/"):                               # between checkpoints 2 and 4
            workers = [int(pid) for task in os.listdir(f"/proc/{proc.pid}/task")  # its children: the workers
                       for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
            for pid in workers + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
            break
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and len(read_metrics(killed)) == 3
    proc = torchrun(killed, sft, "--resume=1")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "resumed from" in out and "at iteration 2" in out
    assert read_metrics(killed) == read_metrics(straight)           # every process resumed its own stream


def barrier_worker(rank, tmp):
    """Rank 0 is slow in rank_zero_first's block and before finish; each rank writes a line as it passes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))

    def say(text):
        with open(os.path.join(tmp, "order"), "a") as f:
            f.write(f"{rank} {text}\n")
    with ddp.rank_zero_first():
        say("in")
        if rank == 0:
            time.sleep(1)
        say("out")
    if rank == 0:
        time.sleep(1)
        say("wrote")
    ddp.finish()
    say("finished")


def test_rank_zero_runs_its_block_first_and_finish_waits_for_rank_zero(tmp_path):
    mp.spawn(barrier_worker, args=(str(tmp_path),), nprocs=2)
    lines = (tmp_path / "order").read_text().splitlines()
    assert lines[:4] == ["0 in", "0 out", "1 in", "1 out"]                # the others enter after rank 0 has left
    assert lines.index("0 wrote") < lines.index("1 finished")             # no process ends before rank 0 has written


@pytest.mark.parametrize("sizes, message", [
    (dict(batch_size=15, minibatch_size=5), "batch_size 15 and minibatch_size 5 must be divisible by the number of processes, 2"),
    (dict(batch_size=16, minibatch_size=7), "batch_size 16 and minibatch_size 7 must be divisible by the number of processes, 2"),
    (dict(batch_size=16, minibatch_size=8, algo="grpo", group_size=16), "batch_size / processes = 8 is not divisible by group_size 16"),
])
def test_a_batch_the_processes_cannot_share_is_refused_before_joining(monkeypatch, sizes, message):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=message):
        ddp.setup(train.Config(**sizes), torch.device("cpu"))
    assert not dist.is_initialized()
