"""
The sampler on a GPU: model.generate's loop costs one kernel launch per operation per token, some 100 times more
than the GPU needs to read the weights at batch 64. Here every buffer has a fixed shape and address (a static KV
cache of P + T positions, transformers' StaticCache), so one decode step is the same kernels on the same memory at
every token: 8 steps are captured once as a CUDA graph and replayed, with one wait for the GPU per replay, and
under autocast the weights that train are cast once per replay, not at every token. It draws the same tokens as
model.generate under one seed. train.py uses it on a GPU with --cuda_graph=1 (choose_sampler); docs/gpu.md says
what the tests prove and what is not measured.
"""
import contextlib

import torch
import torch.nn.functional as F

import model
from model import checkpointing_off, draw, position_ids, response_mask, vocab_logits


def choose_sampler(cfg, device):
    """The sampler of a run: generate_static, whose decode steps are CUDA graph replays, on a GPU with
    --cuda_graph=1; else model.generate, the eager loop (a CPU's always)."""
    return generate_static if cfg.cuda_graph and device.type == "cuda" else model.generate


class StaticDecoder:
    """The state of one batch shape (B prompts left-padded to P, T new tokens): the cache, the decode step's
    inputs and outputs, and the step's CUDA graph. It is kept between calls, so the graph is captured once."""

    def __init__(self, lm, B, P, T, eot, n_vocab, device):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        self.lm, self.P, self.eot, self.n_vocab = lm, P, eot, n_vocab
        self.cache = StaticCache(config=lm.config, max_cache_len=P + T)  # keys and values of P + T positions
        # a graph replays kernels, not Python: layers that keep state in Python (a sliding window's length) or
        # read the GPU from the host (dynamic RoPE) take the same steps without one
        self.graphable = (all(type(layer) is StaticLayer for layer in self.cache.layers) and
                          not any("dynamic" in str(getattr(m, "rope_type", "")) for m in lm.modules()))
        self.attn = torch.ones(B, P + T, dtype=torch.long, device=device)  # (B, P + T) the prompts' mask, then 1s
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)   # (B, 1) the token fed to the next step
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)   # (B, 1) its position id
        self.last_pos = (getattr(lm.config, "max_position_embeddings", None) or 2 ** 62) - 1  # its last id
        self.t = torch.zeros(1, dtype=torch.long, device=device)        # (1,) the step
        self.logits = torch.zeros(B, n_vocab or lm.config.vocab_size, device=device)  # (B, V) next-token logits
        self.done = torch.zeros(B, dtype=torch.bool, device=device)     # (B,)
        self.tokens = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T) sampled so far
        self.logprobs = torch.zeros(B, T, device=device)                # (B, T)
        self.graph = None

    def prefill(self, prompt_ids, prompt_mask):
        """The prompts' keys and values into the cache, and the first token's logits (eager: one call)."""
        self.cache.reset()                                               # in place: the graph's addresses stay
        self.attn[:, :self.P].copy_(prompt_mask)
        pos = position_ids(prompt_mask)                                  # (B, P)
        out = self.lm(input_ids=prompt_ids, attention_mask=self.attn, position_ids=pos, cache=self.cache,
                      use_cache=True, logits_to_keep=1)
        self.logits.copy_(vocab_logits(out.logits[:, -1], self.n_vocab))
        self.pos.copy_(pos[:, -1:] + 1)
        self.done.zero_()
        self.t.zero_()

    def step(self):
        """model.generate's loop body on the fixed buffers: draw token t, then the forward pass that predicts t + 1."""
        tok, logp = draw(self.logits, self.done, self.eot)               # (B,), (B,)
        self.tokens.index_copy_(1, self.t, tok[:, None])
        self.logprobs.index_copy_(1, self.t, logp[:, None])
        self.done |= tok == self.eot
        self.tok.copy_(tok[:, None])
        out = self.lm(input_ids=self.tok, attention_mask=self.attn, position_ids=self.pos, cache=self.cache,
                      use_cache=True)                                    # the cache's slot P + t, in place
        self.logits.copy_(vocab_logits(out.logits[:, -1], self.n_vocab))
        self.pos.add_(1).clamp_(max=self.last_pos)                       # past it only in steps that are dropped
        self.t += 1

    def steps(self, k):
        """k steps; under autocast, each weight that trains cast once for all k (in a graph: once per replay)."""
        with fresh_autocast(self.tok.device.type):
            for _ in range(k):
                self.step()

    def capture(self, k):
        """Run k steps on a side stream (the warm-up a capture needs), then capture the next k as one graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.steps(k)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.steps(k)                                                # recorded, not run
        self.graph = graph


@contextlib.contextmanager
def fresh_autocast(device_type):
    """The caller's autocast, if any, with a cache of cast weights that starts and ends empty: inside, each weight
    is cast once, as it is now. The caller's block may hold copies cast before an optimizer step (autocast's cache
    lasts as long as its block and never sees a weight change); in a graph the copies live in the graph's memory,
    and every replay casts the weights again."""
    torch.clear_autocast_cache()
    try:
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=torch.is_autocast_enabled(device_type), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


DECODERS = {}                                                            # the two last used StaticDecoders, by shape


def static_decoder(lm, B, P, T, k, eot, n_vocab, device):
    """The StaticDecoder of this model and shape, for k steps per replay (its buffers: T rounded up to a multiple
    of k), built once. The key holds the weights' addresses: a graph reads them there, so a model whose weights
    were replaced (moved, cast) gets a new one. Python-side switches (a peft adapter turned off in place, a hook)
    are part of what a graph recorded: after changing one, clear DECODERS (AdaptersOff is another model, with a
    key of its own)."""
    key = (id(lm), B, P, T, k, eot, n_vocab, torch.is_autocast_enabled(device.type),
           tuple((t.data_ptr(), t.dtype, t.shape) for t in (*lm.parameters(), *lm.buffers())))
    dec = DECODERS.pop(key, None) or StaticDecoder(lm, B, P, -(-T // k) * k, eot, n_vocab, device)
    while len(DECODERS) >= 2:
        DECODERS.pop(next(iter(DECODERS)))                               # the least recently used, cache and graph
    DECODERS[key] = dec                                                  # the most recently used, last
    return dec


@torch.no_grad()
def generate_static(lm, prompt_ids, prompt_mask, max_new_tokens, eot, n_vocab=None, graph=True, steps_per_replay=8):
    """model.generate with a static KV cache and fixed-shape buffers: the same tokens under one seed (the same random
    numbers, drawn in the same order) and the same log-probs up to rounding (attention over masked cache slots).
    graph=True (CUDA only): steps_per_replay steps are one CUDA graph (captured by the shape's first call, whose
    first steps run eagerly), replayed, unless the model's layers keep state in Python (StaticDecoder.graphable).
    The host asks whether every row has finished once per replay, not at each token; the last replay may run
    past max_new_tokens, and what it draws there is dropped. Prompts are left-padded to a multiple of 16 tokens,
    so that batches of one size share a graph. Layers that checkpoint their activations sample in eval mode."""
    with checkpointing_off(lm):                                      # as model.generate
        B, T, k = len(prompt_ids), max_new_tokens, min(steps_per_replay, max_new_tokens)
        pad = -prompt_ids.shape[1] % 16
        prompt_ids, prompt_mask = F.pad(prompt_ids, (pad, 0), value=eot), F.pad(prompt_mask, (pad, 0))  # (B, P)
        dec = static_decoder(lm, B, prompt_ids.shape[1], T, k, eot, n_vocab, prompt_ids.device)
        graph = graph and dec.graphable
        with fresh_autocast(prompt_ids.device.type):
            dec.prefill(prompt_ids, prompt_mask)
        for t in range(k, T + k, k):                                     # t: tokens drawn once these k are
            if graph and dec.graph is None:
                dec.capture(k)                                           # these k steps run, the next k are recorded
            elif graph:
                dec.graph.replay()
            else:
                dec.steps(k)
            if dec.done.all():                                           # one wait for the GPU per k tokens
                break
        mask = response_mask(dec.tokens[:, :min(t, T)], eot)             # (B, min(t, T))
        n = int(mask.sum(1).max())                                       # model.generate's length: the longest one
        return dec.tokens[:, :n].clone(), mask[:, :n], dec.logprobs[:, :n] * mask[:, :n]
