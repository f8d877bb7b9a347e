"""
Data parallel training with PyTorch's own tools, as in nanoGPT: `torchrun --nproc_per_node=N train.py` starts one
process per device, each samples its share of every batch, and DistributedDataParallel averages the gradients.
Every token-level mean is taken over all processes' tokens, so the algorithm is the one-process one
(docs/scale.md). In one process every function here is the plain one: global_mean is x.mean() or masked_mean.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from ppo import masked_mean


def setup(cfg, device):
    """Under torchrun, join its process group: cuda:LOCAL_RANK with NCCL on GPUs, else the CPU with gloo. Returns the
    device of this process. Without torchrun: nothing to do."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    world = int(os.environ["WORLD_SIZE"])
    if cfg.batch_size % world or cfg.minibatch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} and minibatch_size {cfg.minibatch_size} must be "
                         f"divisible by the number of processes, {world}")
    if (cfg.batch_size // world) % cfg.group_size:                      # a group's k responses stay in one process
        raise ValueError(f"batch_size / processes = {cfg.batch_size // world} is not divisible by group_size "
                         f"{cfg.group_size}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first, then the others: it pre-trains or downloads pi_init into a cache, which they read."""
    if dist.is_initialized() and rank() != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and rank() == 0:
        dist.barrier()


def finish():
    """The end of a run: every process waits until rank 0 has written its files, then the process group ends."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def global_mean(x, mask=None):
    """Mean of x over every process's entries (where mask > 0, weighted by mask). In one process:
    x.mean() or masked_mean(x, mask). Call it under torch.no_grad()."""
    if not dist.is_initialized():
        return x.mean() if mask is None else masked_mean(x, mask)
    mask = torch.ones_like(x) if mask is None else mask
    sums = torch.stack([(x * mask).sum(), mask.sum()])                   # (2,)
    dist.all_reduce(sums)
    return sums[0] / sums[1]


def token_means(stats, mask):
    """A minibatch's means over this process's n tokens (a dict of floats, mask (b, T) their weights) -> the means over
    every process's N tokens, and the scale of this process's loss for DDP. The loss is a mean over n tokens; the mean
    over all N is sum(loss * n) / N, and DDP averages the gradients over the processes: scaled by n * world / N, the
    average is that mean's gradient. In one process: the stats unchanged, and a scale of 1."""
    n = mask.sum().item()
    if not dist.is_initialized():
        return stats, 1.0
    sums = torch.tensor([n] + [v * n for v in stats.values()], dtype=torch.float64, device=mask.device)
    dist.all_reduce(sums)
    N = sums[0].item()
    return {k: (s / sums[0]).item() for k, s in zip(stats, sums[1:])}, n * world_size() / N


def gather_all(items):
    """A list from every process, concatenated in rank order. In one process: the list."""
    if not dist.is_initialized():
        return items
    lists = [None] * dist.get_world_size()
    dist.all_gather_object(lists, items)
    return [x for one in lists for x in one]
