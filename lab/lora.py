"""
A large model on one GPU: LoRA adapters (--lora_r, with peft, an optional extra), frozen weights stored in bf16,
and activation checkpointing (--grad_checkpointing; model.checkpointing_off turns it off while sampling).
make_policy builds train.py's policy with them, as the run asks; docs/models.md says what each saves and what the
tests prove.
"""
import copy

import torch
import torch.nn as nn

from lab.cli import one_line
from lab.hf import quiet
from grpo import CRITIC_FREE
from model import add_value_head, bf16


def make_policy(cfg, ref_lm, n_vocab, device):
    """The policy that trains, with its value head, and pi_init beside it, frozen, as the run asks: a copy of pi_init's
    network, or with LoRA the network itself with adapters, pi_init being it with them off (no second copy of its
    weights); frozen weights in bf16 and activation checkpointing where asked (fit_memory)."""
    ref_lm = ref_lm.eval().requires_grad_(False)
    lm = with_lora(ref_lm, cfg) if cfg.lora_r else copy.deepcopy(ref_lm).requires_grad_(True)  # what trains
    policy = add_value_head(lm, n_vocab, device, critic=cfg.algo not in CRITIC_FREE)  # GRPO, RLOO: none
    ref_lm = AdaptersOff(policy.lm) if cfg.lora_r else ref_lm
    fit_memory(cfg, policy, ref_lm, device)                         # bf16 frozen weights, checkpointing: if asked
    return policy, ref_lm


class AdaptersOff:
    """pi_init under LoRA: the policy's own network with its adapters switched off, so no second copy of its
    weights. It is called like the network, and everything else (config, device) is the network's."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, *args, **kwargs):
        with self.lm.disable_adapter():
            return self.lm(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.lm, name)


def require_peft():
    """peft, an optional extra, or one line that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ValueError("--lora_r needs peft, an optional extra: pip install peft") from None
    return peft


def with_lora(lm, cfg):
    """lm with LoRA adapters of rank cfg.lora_r (Hu et al. 2021, arXiv 2106.09685) on the modules that
    cfg.lora_targets names; only they train. By default every linear layer gets one, the LM head too: peft's
    "all-linear" leaves the head out, and then the tiny GPT cannot make a next-token distribution much sharper
    than pi_init's (its final LayerNorm bounds the logits). The B matrices start at 0, so the policy starts exactly
    at pi_init, and there is no dropout, so that pi_theta = pi_old at the first step."""
    peft = require_peft()
    from transformers.pytorch_utils import Conv1D                        # GPT-2's linear layers
    targets = (sorted({name.split(".")[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
               if cfg.lora_targets == "all" else cfg.lora_targets.split(","))
    try:
        with quiet():
            return peft.get_peft_model(lm, peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                           target_modules=targets))
    except ValueError as e:                                              # e.g. no module of that name
        raise ValueError(f"--lora_targets={cfg.lora_targets}: {one_line(e, 300)}") from None


def fit_memory(cfg, policy, ref_lm, device):
    """What a run asked for to fit a large model: in bf16 runs the weights that never train are stored in bf16
    (LoRA's base, or pi_init where that rounds nothing, a bf16 checkpoint, so that the first ratio stays exactly 1
    and the first KL exactly 0); --grad_checkpointing recomputes each layer's activations in the backward pass."""
    if bf16(cfg, device) and cfg.lora_r:
        frozen_to_bf16(policy.lm)
    elif bf16(cfg, device) and exact_in_bf16(ref_lm):
        frozen_to_bf16(ref_lm)
    if cfg.grad_checkpointing:
        checkpoint_activations(policy.lm)


def frozen_to_bf16(module):
    """The weights that never train, stored in bf16: half their memory. Under bf16 autocast they were read in
    bf16 anyway, so a run whose frozen weights are all exact in bf16 (a bf16 checkpoint) computes the same."""
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def exact_in_bf16(module):
    return all(torch.equal(p, p.to(torch.bfloat16).to(p.dtype)) for p in module.parameters())


def checkpoint_activations(lm):
    """Activation (gradient) checkpointing: each layer's activations are recomputed in the backward pass instead
    of kept. transformers checkpoints a layer only in training mode, so the layers themselves are put in it; their
    parts (dropout) stay in eval mode."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under LoRA: the transformers model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in base.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.training = True
