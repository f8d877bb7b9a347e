"""
The model side of the RLHF loop: a causal LM with a scalar value head, its forward pass over prompt and
response, bf16 autocast, the optimizer, and the tiny GPT that the embedded task pre-trains as pi_init (the
sampler is sampler.py). Any Hugging Face causal LM fits (train.py --init): loading one checks that it is
whole, causal, and fits the prompts and the tokenizer, in one line if not.
"""
import contextlib
import copy
import os
import shutil
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import data
from common import one_line, status, write_atomically


# ---------------------------------------------------------------------------------------------
# loading a Hugging Face checkpoint: one line that says what is wrong, not transformers' reports


@contextlib.contextmanager
def quiet():
    """transformers and peft without their load reports, warnings and progress bars while loading, wrapping or
    saving: what matters is checked here and said in one line."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():                                  # and peft's (fan_in_fan_out, deprecations)
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, path, what, lacking=""):
    """cls.from_pretrained(path) with fp32 weights, or a ValueError that names what is wrong: a damaged weights
    file (by name), or weights that lack part of the model, which would then be random (lacking: the likely cause)."""
    try:
        with quiet():
            lm, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise ValueError(f"{what} {path} does not load: {damaged_file(path) or one_line(e, 300)}") from e
    if info["missing_keys"]:
        raise ValueError(f"{what} {path} lacks weights of a {type(lm).__name__}: "
                         f"{', '.join(sorted(info['missing_keys'])[:3])}, which would be random{lacking}")
    return lm


def damaged_file(folder):
    """'<file> is damaged (...)' for the first weights file in folder whose header does not read, else ''."""
    from safetensors import safe_open
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in (n for n in names if n.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(folder, name), "pt"):
                pass
        except Exception as e:
            return f"{os.path.join(folder, name)} is damaged or truncated ({one_line(e, 200)})"
    return ""


@torch.no_grad()
def check_causal(lm, what):
    """Refuse a model whose prediction at a position sees later tokens (an encoder such as BERT loads as a
    causal LM, silently): the sampler and every log-prob here assume that it does not."""
    n = min(6, lm.config.max_position_embeddings)
    ids = torch.randint(lm.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).repeat(2, 1)  # (2, n)
    ids[1, -1] = (ids[0, -1] + 1) % lm.config.vocab_size                 # the two differ in their last token only
    logits = lm(input_ids=ids.to(lm.device)).logits[:, :-1].float()      # (2, n - 1, V) before that token
    if (logits[0] - logits[1]).abs().max() > 1e-5 * logits.abs().max().clamp(min=1):
        raise ValueError(f"{what} is not a causal language model: its predictions depend on later tokens "
                         f"(an encoder such as BERT?)")


def init_config(cfg, enc):
    """pi_init's config, read before its weights (--init) or its pre-training (the tiny GPT)."""
    if not cfg.init:
        return tiny_gpt_config(cfg, enc.n_vocab)
    try:
        with quiet():
            return AutoConfig.from_pretrained(cfg.init)
    except Exception as e:
        raise ValueError(f"--init {cfg.init} holds no model: {one_line(e, 200)}") from None


def load_lm(path, what):
    """A causal LM from a Hugging Face folder or hub id, in fp32, refused in one line if it is damaged, lacks
    weights (its LM head would be random) or is no causal model."""
    lm = load_pretrained(AutoModelForCausalLM, path, what)
    check_causal(lm, f"{what} {path}")
    return lm


def check_fits(enc, prompt_tokens, max_new_tokens, config, what="prompt"):
    """Prompts and tokenizer fit the model (config: its Hugging Face config): no empty prompt, every prompt and
    its response within the context window, every token id a row of the embedding, the same end-of-text."""
    lengths = [len(t) for t in prompt_tokens] or [1]
    if min(lengths) == 0:
        raise ValueError(f"{what} {lengths.index(0) + 1} encodes to no token")
    context, longest = getattr(config, "max_position_embeddings", None), max(range(len(lengths)), key=lengths.__getitem__)
    if context and lengths[longest] + max_new_tokens > context:
        raise ValueError(f"{what} {longest + 1} has {lengths[longest]} tokens: with max_new_tokens={max_new_tokens} "
                         f"it exceeds the context window of {context}")
    if config.vocab_size < enc.n_vocab:                                  # more rows than tokens is fine: masked
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens but the model only {config.vocab_size}")
    eos = config.eos_token_id
    if eos is not None and enc.eot_token not in (eos if isinstance(eos, list) else [eos]):
        raise ValueError(f"tokenizer {enc.name} ends texts with id {enc.eot_token} but the model with {eos}: "
                         "not the model's tokenizer (--tokenizer)")


# ---------------------------------------------------------------------------------------------
# model: a causal LM with a scalar value head on its last hidden state


class PolicyWithValue(nn.Module):
    def __init__(self, lm, n_vocab=None):
        super().__init__()
        self.lm, self.n_vocab = lm, n_vocab
        self.v_head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, prompt_len):
        """Logits (B, T, V) and values (B, T) at the states before each response token, both fp32."""
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, prompt_len, self.n_vocab)
        with torch.autocast(hidden.device.type, enabled=False):          # the value head in fp32, even in bf16 runs
            return logits, self.v_head(hidden.float()).squeeze(-1)


def vocab_logits(logits, n_vocab):
    """The logits (..., V) of the tokenizer's V = n_vocab tokens, in fp32. A model's embedding may be padded
    beyond its tokenizer (Pythia: 50,304 rows for 50,277 tokens): the sampler and every log-prob see the
    same V tokens, so that no id decode cannot read is sampled and ratios start at exactly 1."""
    return logits[..., :n_vocab].float()


def position_ids(mask):
    """Position ids that skip left padding, for the scoring forward and the sampler alike: mask (B, L) -> (B, L)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)                            # (B, L) padding at 0, then 0, 1, 2, ...


def lm_forward(lm, input_ids, attention_mask, prompt_len, n_vocab=None, prompt_logits=None):
    """input_ids, attention_mask (B, P + T), prompts left-padded to P. Returns the logits (B, T, V)
    that predict the T response tokens and the last hidden states (B, T, H) at the same positions.
    n_vocab: the tokenizer's vocabulary size (None: all of the model's logits).
    prompt_logits: whether the LM head also runs at the prompt's positions, whose logits are dropped (None: on a
    CPU only). Skipping them (transformers' logits_to_keep) saves (P - 1) / (P + T) of the head's work and
    memory, a fifth of a 124M model's update with 256-token prompts, but sums the head's weight gradient in
    another order: on a CPU, fp32 runs keep their rounding, and so this README's numbers, to the last digit."""
    T = input_ids.shape[1] - prompt_len
    if prompt_logits is None:
        prompt_logits = input_ids.device.type == "cpu"
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
             output_hidden_states=True, use_cache=False,                 # no KV cache to keep
             logits_to_keep=0 if prompt_logits else T + 1)              # logits (B, P + T or T + 1, V); 0: all
    response_states = slice(-T - 1, -1)                                  # position t predicts token t + 1
    return vocab_logits(out.logits[:, response_states], n_vocab), out.hidden_states[-1][:, response_states]


def token_logprobs(logits, tokens):
    """log pi(tokens): logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


@torch.no_grad()
def entropy(logits, rows=8):
    """Entropy of each next-token distribution: logits (B, T, V) -> (B, T). Only logged, so it is computed
    a few rows at a time: no (B, T, V) temporaries beside the logits (1.6 GB at B=64, T=128, V=50k)."""
    def chunk(x):                                                        # (rows, T, V) -> (rows, T)
        logp = torch.log_softmax(x, -1)
        return -(logp.exp() * logp).sum(-1)
    return torch.cat([chunk(x) for x in logits.split(rows)])


# ---------------------------------------------------------------------------------------------
# the paper's larger models on one GPU: LoRA (peft, an optional extra), frozen weights in bf16, activation
# checkpointing


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


def with_lora(lm, cfg):
    """lm with LoRA adapters of rank cfg.lora_r (Hu et al. 2021, arXiv 2106.09685) on the modules cfg.lora_targets
    names, by default every linear layer, the LM head too (peft's "all-linear" leaves it out; without it the tiny
    GPT cannot make a next-token distribution much sharper than pi_init's: its final LayerNorm bounds the logits,
    and the exact gap stalls); only they train. Their B matrices start at 0, so the policy starts exactly at
    pi_init. No dropout in them, so that pi_theta = pi_old at the first step, as everywhere here."""
    try:
        import peft
    except ImportError:
        raise ValueError("--lora_r needs peft, an optional extra: pip install peft") from None
    from transformers.pytorch_utils import Conv1D                        # GPT-2's linear layers
    targets = (sorted({name.split(".")[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
               if cfg.lora_targets == "all" else cfg.lora_targets.split(","))
    try:
        with quiet():
            return peft.get_peft_model(lm, peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                           target_modules=targets))
    except ValueError as e:                                              # e.g. no module of that name
        raise ValueError(f"--lora_targets={cfg.lora_targets}: {one_line(e, 300)}") from None


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


def make_policy(cfg, lm, n_vocab, device):
    """The policy with its value head (V = 0 at the start) and pi_init, from pi_init's network lm: a copy of it
    that trains, or with LoRA the same network with adapters, pi_init being it with them off. Frozen weights are
    kept in bf16 in bf16 runs: LoRA's base, and pi_init where that rounds nothing (a bf16 checkpoint), so that
    the first ratio stays exactly 1 and the first KL exactly 0."""
    ref_lm = lm.eval().requires_grad_(False)
    if cfg.lora_r:
        policy = PolicyWithValue(with_lora(lm, cfg), n_vocab)
        ref_lm = AdaptersOff(policy.lm)
        if bf16(cfg, device):
            frozen_to_bf16(policy.lm)
    else:
        policy = PolicyWithValue(copy.deepcopy(ref_lm).requires_grad_(True), n_vocab)
        if bf16(cfg, device) and exact_in_bf16(ref_lm):
            frozen_to_bf16(ref_lm)
    policy = policy.to(device).eval()  # no dropout: the update sees the very policy that sampled (pi_theta = pi_old)
    if cfg.grad_checkpointing:
        checkpoint_activations(policy.lm)
    nn.init.zeros_(policy.v_head.weight)                                 # V = 0 at the start, for every seed
    nn.init.zeros_(policy.v_head.bias)
    return policy, ref_lm


def make_optimizer(policy, lr, device):
    """Adam over the weights that train; on a GPU fused, one kernel over all of them per step (the same update)."""
    return torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr, fused=device.type == "cuda")


def get_device(cfg):
    """auto: cuda if torch sees a GPU, else cpu."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda, but torch finds no CUDA GPU on this machine (use --device=cpu or auto)")
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                        "cpu" if cfg.device == "auto" else cfg.device)


def bf16(cfg, device):
    """Whether the run is bf16: --precision=bf16, or auto on a GPU."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg, device):
    """bf16 autocast with --precision=bf16 (the default on a GPU; on a CPU too when asked), else nothing.
    Logits are cast to fp32 before any log_softmax, and the value head and the losses run in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16(cfg, device))


def tiny_gpt_config(cfg, vocab_size):
    return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt(cfg, vocab_size):
    return GPT2LMHeadModel(tiny_gpt_config(cfg, vocab_size))


def pretrain(cfg, enc, device):
    """pi_init for the embedded task: the tiny GPT trained on the grammar's reviews (next-token loss).
    Cached in cfg.sft_dir, keyed by the tokenizer, the model's shape, the steps and the learning rate."""
    path = os.path.join(cfg.sft_dir, f"{enc.name}_V{enc.n_vocab}_L{cfg.n_layer}_H{cfg.n_head}_D{cfg.n_embd}_"
                                     f"C{cfg.block_size}_S{cfg.sft_steps}_lr{cfg.sft_lr:g}")
    if os.path.isdir(path):
        try:
            return load_pretrained(GPT2LMHeadModel, path, "the pi_init cache").to(device)
        except ValueError as e:
            print(f"warning: {e}: pre-training it again")
        shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(1234)                                              # the same pi_init for every run seed
    lm = tiny_gpt(cfg, enc.n_vocab).to(device)
    docs = [enc.encode_ordinary(text) + [enc.eot_token] for text in data.task_corpus(20_000)]
    ids = torch.tensor([t for d in docs for t in d], device=device)      # (N,) one stream of reviews
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.sft_steps):
        starts = torch.randint(len(ids) - cfg.block_size - 1, (64,), device=device)
        x = torch.stack([ids[s:s + cfg.block_size] for s in starts])     # (64, C)
        y = torch.stack([ids[s + 1:s + cfg.block_size + 1] for s in starts])
        loss = F.cross_entropy(lm(input_ids=x).logits.flatten(0, 1), y.flatten())
        for g in opt.param_groups:
            g["lr"] = cfg.sft_lr * min(1.0, 2 * (1 - step / cfg.sft_steps))  # flat, then linear decay
        opt.zero_grad()
        loss.backward()
        opt.step()
        status(f"pre-training pi_init: step {step + 1}/{cfg.sft_steps} | loss {loss.item():.3f} | "
               f"{time.time() - t0:.0f}s", done=step + 1 == cfg.sft_steps)
    try:
        with quiet():
            write_atomically(path, lm.save_pretrained)                    # runs may build it at once: each its own tmp
    except OSError as e:
        if not os.path.isdir(path):                                      # else another run cached it first: use ours
            raise OSError(f"could not write the pi_init cache {path} ({e.strerror or e}): nothing was cached") from e
    return lm
