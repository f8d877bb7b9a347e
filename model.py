"""
The policy side of the RLHF loop: a causal LM with a scalar value head, its forward pass over prompt and response,
the sampler (temperature 1, with the log-probs of what it draws), the device and precision, the optimizer, and the
tiny GPT that the embedded task pre-trains as pi_init. It imports nothing from lab/: train.py loads a Hugging Face
checkpoint instead (--init, lab/hf.py), caches the tiny GPT (lab/runs.py), adds LoRA and bf16 frozen weights
(lab/lora.py), and may sample with a CUDA graph (lab/static_sampler.py).
"""
import contextlib
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import data

# ---------------------------------------------------------------------------------------------
# the policy: a causal LM with a scalar value head on its last hidden state


class PolicyWithValue(nn.Module):
    def __init__(self, lm, n_vocab=None):
        super().__init__()
        self.lm, self.n_vocab = lm, n_vocab
        self.v_head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, prompt_len, values=True):
        """Logits (B, T, V) and values (B, T) at the states before each response token, both fp32. values=False:
        the logits and None, without the hidden states (GRPO and RLOO have no use for values)."""
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, prompt_len, self.n_vocab, hidden=values)
        if not values:
            return logits, None
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


def lm_forward(lm, input_ids, attention_mask, prompt_len, n_vocab=None, prompt_logits=None, hidden=True):
    """input_ids, attention_mask (B, P + T), prompts left-padded to P. Returns the logits (B, T, V)
    that predict the T response tokens and the last hidden states (B, T, H) at the same positions (hidden=False:
    None). n_vocab: the tokenizer's vocabulary size (None: all of the model's logits).
    prompt_logits: whether the LM head also runs at the prompt's positions, whose logits are dropped (None: on a
    CPU only). Skipping them (transformers' logits_to_keep) saves (P - 1) / (P + T) of the head's work and
    memory, but sums the head's weight gradient in another order: on a CPU, fp32 runs keep their rounding, and so
    the numbers in the README, to the last digit."""
    T = input_ids.shape[1] - prompt_len
    if prompt_logits is None:
        prompt_logits = input_ids.device.type == "cpu"
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
             output_hidden_states=hidden, use_cache=False,               # no KV cache to keep
             logits_to_keep=0 if prompt_logits else T + 1)              # logits (B, P + T or T + 1, V); 0: all
    response_states = slice(-T - 1, -1)                                  # position t predicts token t + 1
    return (vocab_logits(out.logits[:, response_states], n_vocab),
            out.hidden_states[-1][:, response_states] if hidden else None)


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
# the sampler: responses at temperature 1, with the log-probs of the tokens drawn


def left_pad(token_lists, pad_id, device):
    """Token lists -> ids, attention mask, both (B, P), padded on the left."""
    width = max(map(len, token_lists))
    ids = [[pad_id] * (width - len(t)) + t for t in token_lists]
    mask = [[0] * (width - len(t)) + [1] * len(t) for t in token_lists]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def right_pad(token_lists, pad_id, device):
    """Token lists -> ids, attention mask, both (B, L), padded on the right (a reward model reads the last real token)."""
    width = max(map(len, token_lists))
    ids = [t + [pad_id] * (width - len(t)) for t in token_lists]
    mask = [[1] * len(t) + [0] * (width - len(t)) for t in token_lists]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def sample_token(probs):
    """One token from each row of probs (B, V) -> (B,): the argmax of probs / E with E_i ~ Exp(1) independent.
    E_i / probs_i ~ Exp(probs_i), and the smallest of independent exponentials is the i-th with probability
    probs_i / sum(probs). torch.multinomial(probs, 1) draws this way too (the same tokens under one seed);
    written out, it is a few tensor ops that never wait for the GPU, so a CUDA graph can hold it."""
    noise = torch.empty_like(probs).exponential_()                       # (B, V) E
    return torch.div(probs, noise, out=noise).argmax(-1)                 # (B,) in place, as multinomial divides


def draw(logits, done, eot):
    """The next token of each row from its logits (B, V), end-of-text in rows that have ended, and the token's
    log-prob: (B,), (B,). This loop and the GPU's static decoder (lab/static_sampler.py) both draw here."""
    logp = torch.log_softmax(logits, -1)                                 # (B, V)
    tok = torch.where(done, eot, sample_token(logp.exp()))               # (B,) finished rows: padding
    return tok, logp.gather(1, tok[:, None]).squeeze(1)                  # (B,), (B,)


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, max_new_tokens, eot, n_vocab=None):
    """Sample responses at temperature 1 (no top-k/top-p) with a KV cache, stopping at end-of-text.
    prompt_ids, prompt_mask (B, P), left-padded. Returns response (B, T), mask (B, T) that is 1 up to
    and including the first end-of-text, and the sampler's log-probs (B, T) (0 on padding).
    n_vocab: the tokenizer's vocabulary size; ids beyond it are never sampled (None: all of the model's).
    The cache grows by one position per token, and the host waits for the device once per token (to know whether
    every row has ended): on a GPU, lab/static_sampler.py's CUDA graph avoids both."""
    with checkpointing_off(lm):
        attn = prompt_mask
        pos = position_ids(attn)                                         # (B, P)
        out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)  # (B,)
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            tok, logp = draw(vocab_logits(out.logits[:, -1], n_vocab), done, eot)  # (B,), (B,)
            tokens.append(tok)
            logprobs.append(logp)
            done |= tok == eot
            if done.all():
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)    # (B, P + t)
            pos = pos[:, -1:] + 1                                        # (B, 1)
            out = lm(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, cache=out.cache, use_cache=True)
    response = torch.stack(tokens, 1)                                    # (B, T)
    mask = response_mask(response, eot)                                  # (B, T)
    return response, mask, torch.stack(logprobs, 1) * mask


@contextlib.contextmanager
def checkpointing_off(lm):
    """The layers that lab/lora.py's checkpoint_activations put in training mode, in eval mode while sampling:
    transformers drops the KV cache of a checkpointing layer, and GPT-2's then sees only the newest token, silently."""
    layers = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False) and m.training]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m in layers:
            m.training = True


def response_mask(response, eot):
    """1 up to and including each row's first end-of-text: response (B, T) -> (B, T)."""
    is_eot = (response == eot).int()                                     # (B, T)
    return (is_eot.cumsum(1) - is_eot == 0).float()                      # (B, T) no end-of-text before t


@torch.no_grad()
def sample(cfg, lm, idx, prompt_tokens, enc, device, generate=generate):
    """Responses of lm to the prompts numbered idx, and their text. Returns prompt ids and mask (B, P), response,
    its mask and the sampler's log-probs (B, T), and the decoded completions (end-of-text dropped).
    generate: this file's loop, or lab/static_sampler.generate_static on a GPU."""
    prompt_ids, prompt_mask = left_pad([prompt_tokens[i] for i in idx], enc.eot_token, device)  # (B, P)
    with autocast(cfg, device):
        response, mask, logprobs = generate(lm, prompt_ids, prompt_mask, cfg.max_new_tokens, enc.eot_token, enc.n_vocab)
    completions = [enc.decode([t for t in r if t != enc.eot_token]) for r in response.tolist()]
    return prompt_ids, prompt_mask, response, mask, logprobs, completions


# ---------------------------------------------------------------------------------------------
# device, precision, memory


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


def set_cpu_threads(cfg, device):
    """torch's threads on a CPU for what follows: --threads, else one for the tiny GPT of the embedded task, and
    torch's default (a thread a core) for a model of your own (--init). The tiny GPT's operations are small: a second
    thread speeds an iteration up 1.5x on an idle machine, and slows it down 2-3x beside other busy processes, whose
    threads and torch's spin for the same cores (docs/models.md)."""
    if device.type == "cpu" and (cfg.threads or not cfg.init):
        torch.set_num_threads(cfg.threads or 1)


def peak_memory_mb(device):
    """cuda: the most memory tensors held since the last reset (max_memory_allocated). cpu: the process's peak
    resident set size so far, which never goes down: on Linux VmHWM (in KiB), as ru_maxrss there also counts the
    process that started this one; elsewhere ru_maxrss (in bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ---------------------------------------------------------------------------------------------
# the policy and its optimizer


def add_value_head(lm, n_vocab, device, critic=True):
    """The policy: the network lm that trains (a copy of pi_init, or pi_init with LoRA adapters) with a value head whose
    output starts at 0 for every seed, on device, in eval mode: no dropout, so the update sees the very policy that
    sampled (pi_theta = pi_old). critic=False (GRPO and RLOO): the value head does not train."""
    policy = PolicyWithValue(lm, n_vocab).to(device).eval()
    nn.init.zeros_(policy.v_head.weight)                                 # V = 0 at the start
    nn.init.zeros_(policy.v_head.bias)
    policy.v_head.requires_grad_(critic)
    return policy


def make_optimizer(policy, lr, device):
    """Adam over the weights that train; on a GPU fused, one kernel over all of them per step (the same update)."""
    return torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr, fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# pi_init of the embedded task: the tiny GPT, pre-trained on the grammar's reviews


def tiny_gpt_config(cfg, vocab_size):
    return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt(cfg, vocab_size):
    return GPT2LMHeadModel(tiny_gpt_config(cfg, vocab_size))


def pretrain(cfg, enc, device):
    """pi_init for the embedded task: the tiny GPT trained on the grammar's reviews (next-token loss), the same
    network for every run seed. train.py caches it in sft_dir (lab/runs.py), so that it is trained once."""
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
    return lm


# ---------------------------------------------------------------------------------------------
# progress


LAST_STATUS = [0.0]                                                      # when status() last printed a line


def status(text, done=False):
    """Progress of a long step. On a terminal: one line, rewritten in place. In a log: a plain line
    at most every 10 seconds, and always the last one (done=True). Under torchrun: rank 0 alone."""
    if os.environ.get("RANK", "0") != "0":
        return
    if sys.stdout.isatty():
        print("\r\033[K" + text, end="\n" if done else "", flush=True)
    elif done or time.time() - LAST_STATUS[0] >= 10:
        print(text, flush=True)
        LAST_STATUS[0] = time.time()
