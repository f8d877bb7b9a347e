"""
Real checkpoint families as policy and pi_init, each a tiny random-weight model saved with a tokenizer
of its own (byte-level BPE built offline with the `tokenizers` library): GPT-2, GPT-NeoX (Pythia)
with a padded vocabulary, and Llama. For each: the sampler's log-probs equal a full forward pass
(left padding, position ids, KV cache), left padding changes no log-prob, and `--init` trains and
saves a policy that `from_pretrained` loads. Also: tokenizer/model mismatches, and bf16 on a CPU.
Run: python -m pytest -q tests/test_models.py
"""
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import (AutoModelForCausalLM, BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, GPTNeoXConfig, LlamaConfig,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

import data
import model
import train
from lab import hf, lora, static_sampler

hf_logging.disable_progress_bar()

PAD_ROWS = 13                                                       # Pythia-style padding of the embedding


@functools.cache
def bpe():
    """A byte-level BPE of 300 tokens trained on the task's reviews, end-of-text id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(data.task_corpus(2000), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def save_tokenizer(path):
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe(), eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def make_config(arch, vocab, eot):
    small = dict(bos_token_id=eot, eos_token_id=eot)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, **small)
    if arch == "gpt_neox":                                           # rotary on a quarter of each head
        return GPTNeoXConfig(vocab_size=vocab + PAD_ROWS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, **small)
    return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **small)


def save_checkpoint(arch, path):
    """A tiny random model of the family and its tokenizer, in one folder. With a padded vocabulary the
    padding rows get large logits, so that a sampler that does not mask them picks them at once."""
    tok = save_tokenizer(path)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(make_config(arch, len(tok), tok.eos_token_id))
    with torch.no_grad():
        lm.get_output_embeddings().weight[len(tok):] *= 100
    lm.save_pretrained(path)
    return lm.eval(), tok


ARCHS = ["gpt2", "gpt_neox", "llama"]


def full_forward_logprobs(lm, ids, mask, response, resp_mask, n_vocab):
    """The log-probs (B, T) of response after the left-padded prompts ids, by one forward pass of the whole
    sequence: what a sampler's log-probs must equal."""
    with torch.no_grad():
        logits, _ = model.lm_forward(lm, torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1),
                                     ids.shape[1], n_vocab)
    return model.token_logprobs(logits, response) * resp_mask


@pytest.mark.parametrize("arch", ARCHS)
def test_sampler_logprobs_equal_full_forward_pass(arch, tmp_path):
    lm, tok = save_checkpoint(arch, tmp_path)
    n_vocab, eot = len(tok), tok.eos_token_id
    prompts = [tok.encode(p) for p in ["the plot", "the music was very", "the", "the acting felt quite dull and"]]
    ids, mask = model.left_pad(prompts * 4, eot, torch.device("cpu"))         # (16, P) left padding
    torch.manual_seed(1)
    response, resp_mask, sampler_logprobs = model.generate(lm, ids, mask, 12, eot, n_vocab)  # (16, T)
    assert response.max() < n_vocab                                   # no padding row of the embedding sampled
    with torch.no_grad():
        logits, _ = model.lm_forward(lm, torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1),
                                     ids.shape[1], n_vocab)           # (16, T, V)
    assert logits.shape[-1] == n_vocab
    full = model.token_logprobs(logits, response) * resp_mask
    torch.testing.assert_close(sampler_logprobs, full, atol=1e-5, rtol=1e-5)


def test_sample_token_draws_what_multinomial_draws():
    """The sampler's draw (argmax of probs / Exp(1) noise) is torch.multinomial's, to the token under one seed, and
    its frequencies are the probabilities."""
    probs = torch.softmax(3 * torch.randn(64, 50, generator=torch.Generator().manual_seed(0)), -1)  # (64, V)
    torch.manual_seed(3)
    ours = model.sample_token(probs)                                  # (64,)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.multinomial(probs, 1).squeeze(-1))
    draws = model.sample_token(probs[:1].expand(200_000, -1))         # (200000,) from one distribution
    freq = torch.bincount(draws, minlength=50) / len(draws)
    assert (freq - probs[0]).abs().sum() / 2 < 0.01                   # total variation (sampling noise ~0.003)


def likely_eot(lm, eot, logit=4.0):
    """lm with end-of-text's logit raised, so that every row of a batch ends within some 30 tokens (the bias a
    buffer of the LM head, so that it moves with the model)."""
    head = lm.get_output_embeddings()
    head.register_buffer("eot_bias", torch.zeros(lm.config.vocab_size))
    head.eot_bias[eot] = logit
    head.register_forward_hook(lambda module, inputs, out: out + module.eot_bias)
    return lm


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_sampler_draws_generates_tokens_and_its_logprobs_are_a_full_forward_pass(arch, tmp_path):
    """generate_static, the GPU sampler's path without the CUDA graph (which needs CUDA), against generate under
    one seed: the same tokens and masks, and log-probs equal to a full forward pass; also when every row ends
    before max_new_tokens (end-of-text made likely): the same, shorter, length; and in a second call with other
    prompts, which reuses the first call's decoder (its cache and buffers)."""
    lm, tok = save_checkpoint(arch, tmp_path)
    n_vocab, eot = len(tok), tok.eos_token_id
    prompts = [tok.encode(p) for p in ["the plot", "the music was very", "the", "the acting felt quite dull and"]]
    ids, mask = model.left_pad(prompts * 4, eot, torch.device("cpu"))   # (16, 16) left padding
    other = model.left_pad(prompts[2::-1] * 5 + prompts[:1], eot, torch.device("cpu"))  # (16, 11): padded to 16 more
    assert mask.shape[1] == 16 and other[1].shape[1] == 11
    static_sampler.DECODERS.clear()
    for lm, T, (ids, mask) in ((lm, 12, (ids, mask)), (lm, 12, other), (likely_eot(copy.deepcopy(lm), eot), 40, other)):
        torch.manual_seed(1)
        eager = model.generate(lm, ids, mask, T, eot, n_vocab)
        torch.manual_seed(1)
        response, resp_mask, logprobs = static_sampler.generate_static(lm, ids, mask, T, eot, n_vocab, graph=False)
        assert torch.equal(response, eager[0]) and torch.equal(resp_mask, eager[1])
        assert (response.shape[1] == T) == (T == 12)                  # with likely end-of-text: every row ended early
        torch.testing.assert_close(logprobs, full_forward_logprobs(lm, ids, mask, response, resp_mask, n_vocab),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logprobs, eager[2], atol=1e-5, rtol=1e-5)
    assert len(static_sampler.DECODERS) == 2                                   # one per model: the second call reused the first's


def test_a_run_samples_with_the_cuda_graph_on_a_gpu_only_with_cuda_graph_1():
    """The choice of sampler, which a CPU can check: the static decoder and its CUDA graph on a GPU with
    --cuda_graph=1 (opt-in until a GPU has run it); else, and always on a CPU, the eager loop."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert static_sampler.choose_sampler(train.Config(cuda_graph=True), cuda) is static_sampler.generate_static
    assert static_sampler.choose_sampler(train.Config(cuda_graph=False), cuda) is model.generate
    assert static_sampler.choose_sampler(train.Config(), cuda) is model.generate       # the default
    assert static_sampler.choose_sampler(train.Config(cuda_graph=True), cpu) is model.generate


def test_static_sampler_reaches_the_end_of_the_context_window(tmp_path):
    """A prompt and its response that fill GPT-2's context window (learned positions, 64), with 9 new tokens: the
    static path runs 16 steps (two of 8) and drops the last 7, which must not ask for a position past the window."""
    lm, tok = save_checkpoint("gpt2", tmp_path)
    eot, T = tok.eos_token_id, 9
    text = tok.encode("the plot was very dull but the cast was charming and the music was great. " * 10)
    ids = torch.tensor([text[:lm.config.n_positions - T]])             # (1, 55)
    mask = torch.ones_like(ids)
    assert ids.shape[1] + T == lm.config.n_positions                   # as much as checks.check_fits lets through
    torch.manual_seed(0)
    eager = model.generate(lm, ids, mask, T, eot, len(tok))
    torch.manual_seed(0)
    static = static_sampler.generate_static(lm, ids, mask, T, eot, len(tok), graph=False)
    assert all(torch.equal(a, b) for a, b in zip(eager[:2], static[:2])) and static[0].shape[1] == T


def test_static_decoders_keep_the_two_last_used_and_a_graph_only_where_layers_keep_no_python_state(tmp_path):
    """Decoders are kept per model and shape, the two last used (a hit counts as a use); and the graph is only
    for models whose cache layers and rotary embeddings keep no state in Python: a sliding window (Mistral) and
    dynamic RoPE take the static steps without one."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM
    lm, tok = save_checkpoint("llama", tmp_path)
    eot = tok.eos_token_id
    static_sampler.DECODERS.clear()
    shapes = {}
    for name, rows in (("A", 2), ("B", 4), ("A", 2), ("C", 6)):                 # A is used again before C comes
        ids, mask = model.left_pad([tok.encode("the plot")] * rows, eot, torch.device("cpu"))
        static_sampler.generate_static(lm, ids, mask, 3, eot, len(tok), graph=False)
        shapes.setdefault(name, next(reversed(static_sampler.DECODERS.values())))  # each shape's, when it was built
    assert list(static_sampler.DECODERS.values()) == [shapes["A"], shapes["C"]]      # B, the least recently used, left
    small = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64, bos_token_id=eot, eos_token_id=eot)
    dynamic = dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    for lm, graphable in ((lm, True), (MistralForCausalLM(MistralConfig(sliding_window=8, **small)), False),
                          (LlamaForCausalLM(LlamaConfig(**small, **dynamic)), False)):
        assert static_sampler.StaticDecoder(lm, 2, 16, 4, eot, len(tok), torch.device("cpu")).graphable == graphable


def test_static_sampler_reads_the_weights_of_now_inside_one_autocast_block(tmp_path):
    """bf16 autocast caches its bf16 copies of weights that train until its block ends; the static path reads the
    weights as a CUDA graph does, cast as they are now: changed in place within one block, the new weights'
    log-probs; and it leaves no copies of its own in the caller's block (on a GPU they would be the graph's)."""
    lm, tok = save_checkpoint("gpt_neox", tmp_path)
    lm.requires_grad_(True)
    ids, mask = model.left_pad([tok.encode("the plot"), tok.encode("the music was very")], tok.eos_token_id,
                                 torch.device("cpu"))
    cfg = train.Config(precision="bf16")
    with torch.no_grad(), model.autocast(cfg, ids.device):
        lm(input_ids=ids)                                                 # the block's cache: the old weights
        lm.get_output_embeddings().weight.mul_(5)
        response, resp_mask, logprobs = static_sampler.generate_static(lm, ids, mask, 8, tok.eos_token_id, len(tok),
                                                                graph=False)
        lm.get_output_embeddings().weight.mul_(2)
        after = full_forward_logprobs(lm, ids, mask, response, resp_mask, len(tok))  # in the same block
    with model.autocast(cfg, ids.device):                                 # a fresh block: the weights of now
        torch.testing.assert_close(after, full_forward_logprobs(lm, ids, mask, response, resp_mask, len(tok)))
    with torch.no_grad():
        lm.get_output_embeddings().weight.div_(2)                         # back to the weights that sampled
    with model.autocast(cfg, ids.device):
        full = full_forward_logprobs(lm, ids, mask, response, resp_mask, len(tok))
    torch.testing.assert_close(logprobs, full, atol=1e-3, rtol=1e-3)


class WeightCasts(TorchDispatchMode):
    """How often each of the tensors whose storage is in weights (data pointers) is cast to another dtype."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.casts = weights, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ptr = args[0].data_ptr() if func._schema.name == "aten::_to_copy" else None
        if ptr in self.weights:
            self.casts[ptr] = self.casts.get(ptr, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_static_steps_cast_each_weight_once_under_autocast(arch, tmp_path):
    """bf16 autocast: the k steps of one call (on a GPU, one graph replay) cast each weight that trains once, not
    at every step, operator by operator: one step and four cast the same weights, each once."""
    lm, tok = save_checkpoint(arch, tmp_path)
    eot = tok.eos_token_id
    ids, mask = model.left_pad([tok.encode("the plot"), tok.encode("the music was very")], eot, torch.device("cpu"))
    dec = static_sampler.StaticDecoder(lm, 2, ids.shape[1], 8, eot, len(tok), torch.device("cpu"))
    weights = {p.data_ptr() for p in lm.parameters()}
    with torch.no_grad(), model.autocast(train.Config(precision="bf16"), ids.device):
        dec.prefill(ids, mask)
        with WeightCasts(weights) as one:
            dec.steps(1)
        with WeightCasts(weights) as four:
            dec.steps(4)
    assert len(one.casts) >= 4 * lm.config.num_hidden_layers                 # at least attention's and MLP's
    assert one.casts == four.casts
    assert set(four.casts.values()) == {1} and dec.t.item() == 5


class HostReads(TorchDispatchMode):
    """Counts the operators that run, and records those that read tensor values on the host (`.item()`, `if
    tensor`: _local_scalar_dense) or whose output's shape depends on them (nonzero, masked_select, indexing by
    a boolean mask, unique): on a GPU each waits for the device, and a CUDA graph cannot hold one."""
    DATA_DEPENDENT = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                      "aten::unique_dim", "aten::unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops += 1
        if name in self.DATA_DEPENDENT or (name == "aten::index" and any(i is not None and i.dtype == torch.bool
                                                                         for i in args[1])):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_never_reads_a_tensor_on_the_host(arch, tmp_path):
    """The decode step that the GPU captures as a CUDA graph, operator by operator: none reads a value on the
    host or makes a shape from one (HostReads), over two steps of the model's whole forward pass."""
    lm, tok = save_checkpoint(arch, tmp_path)
    eot = tok.eos_token_id
    ids, mask = model.left_pad([tok.encode("the plot"), tok.encode("the music was very")], eot, torch.device("cpu"))
    dec = static_sampler.StaticDecoder(lm, 2, ids.shape[1], 4, eot, len(tok), torch.device("cpu"))
    dec.prefill(ids, mask)
    with torch.no_grad(), HostReads() as step:
        dec.steps(2)
    assert step.reads == [] and step.ops > 100 and dec.t.item() == 2  # the forward passes ran, under the mode
    with HostReads() as host:                                         # what it flags: a step that asks the host
        bool(dec.done.all()), dec.tokens[dec.tokens > 3]
    assert host.reads == ["aten::_local_scalar_dense", "aten::index"]


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_changes_no_logprob(arch, tmp_path):
    """A sequence alone and the same sequence left-padded in a batch: the same log-probs (position ids)."""
    lm, tok = save_checkpoint(arch, tmp_path)
    short, long = tok.encode("the plot was"), tok.encode("the acting felt quite dull and the music")
    response = torch.tensor([tok.encode(" great and the cast was charming.")] * 2)  # (2, T)
    ids, mask = model.left_pad([short, long], tok.eos_token_id, torch.device("cpu"))
    assert mask[0, 0] == 0                                            # the short one is padded
    with torch.no_grad():
        batched, _ = model.lm_forward(lm, torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1),
                                      ids.shape[1], len(tok))
        alone, _ = model.lm_forward(lm, torch.tensor([short + response[0].tolist()]),
                                    torch.ones(1, len(short) + response.shape[1], dtype=torch.long), len(short), len(tok))
    torch.testing.assert_close(model.token_logprobs(batched[:1], response[:1]), model.token_logprobs(alone, response[:1]),
                               atol=1e-5, rtol=1e-5)


def length_reward(prompts, completions):
    """A reward that random-weight models earn too (they never write the task's adjectives)."""
    return [len(c) / 40 for c in completions]


def run_args(init, out, *extra):
    return [f"--init={init}", f"--out_dir={out}", "--algo=ppo", "--iters=2", "--batch_size=8", "--minibatch_size=8",
            "--epochs=1", "--lr=1e-3", "--max_new_tokens=8", "--jstar_samples=0", "--sample_every=0", "--eval_every=0",
            "--reward_fn=test_models:length_reward", "--device=cpu", *extra]  # CPU numbers unless extra says cuda


def head_flops_and_grads(lm, ids, mask, P, n_vocab, **kwargs):
    """lm_forward's logits and hidden states, then one backward pass of their sum: the matrix-product FLOPs of both
    passes, the outputs, and the gradient of every weight that trains."""
    lm.zero_grad(set_to_none=True)
    flops = FlopCounterMode(display=False)
    with flops:
        logits, hidden = model.lm_forward(lm, ids, mask, P, n_vocab, **kwargs)  # (B, T, V), (B, T, H)
        (model.token_logprobs(logits, ids[:, P:]).sum() + hidden.sum()).backward()
    return flops.get_total_flops(), logits, hidden, [p.grad for p in lm.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ARCHS + ["lora"])
def test_lm_head_on_the_response_alone_changes_no_logprob_and_skips_the_prompts_positions(arch, tmp_path):
    """The LM head at the response's positions alone (the default on a GPU): the same logits, hidden states and
    gradients as a head over every position (the CPU's default, to the bit), and fewer FLOPs: without LoRA, 6 H V
    for each of the B (P - 1) positions whose logits are dropped (a forward and two backward products of the
    head)."""
    lm, tok = save_checkpoint("gpt2" if arch == "lora" else arch, tmp_path)
    if arch == "lora":                                                # peft passes logits_to_keep on
        pytest.importorskip("peft")
        lm = lora.with_lora(lm, train.Config(lora_r=4))
    prompts = [tok.encode(p) for p in ["the plot", "the acting felt quite dull and"]]
    ids, mask = model.left_pad(prompts, tok.eos_token_id, torch.device("cpu"))  # (2, P)
    response = torch.tensor([tok.encode(" great and the cast was charming.")] * 2)  # (2, T)
    ids, mask, P = torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1), ids.shape[1]
    default, full, cut = (head_flops_and_grads(lm, ids, mask, P, len(tok), **kw)
                          for kw in ({}, {"prompt_logits": True}, {"prompt_logits": False}))
    outputs = [[*run[1:3], *run[3]] for run in (default, full, cut)]  # logits, hidden states, gradients
    assert all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[1]))
    for a, b in zip(outputs[1], outputs[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert default[0] == full[0]
    head = lm.get_output_embeddings()
    if arch == "lora":                                                # the adapters' products at those positions too
        assert cut[0] < full[0]
    else:
        assert full[0] - cut[0] == 6 * ids.shape[0] * (P - 1) * head.in_features * head.out_features


@pytest.mark.parametrize("arch", ARCHS)
def test_init_trains_with_its_own_tokenizer_and_saves_a_loadable_policy(arch, tmp_path):
    init, out = tmp_path / "init", tmp_path / "out"
    lm, tok = save_checkpoint(arch, init)
    history = train.main(run_args(init, out))
    # the first step of the first iteration sees pi_theta = pi_old: every ratio exactly 1; and the policy and
    # pi_init score the same tokens (the tokenizer's, not the embedding's padding rows): KL exactly 0
    assert len(history) == 2 and history[0]["approx_kl"] < 1e-9 and history[0]["clipfrac"] == 0
    assert history[0]["kl"] == 0
    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert type(trained) is type(lm) and hf.HFTokenizer(str(out / "policy")).n_vocab == len(tok)
    before, after = lm.state_dict(), trained.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    shutil.rmtree(init)                                              # --sample needs the policy folder alone
    completions, scores = train.main([f"--sample={out / 'policy'}", "--prompt=hello", "--num_samples=2"])
    assert len(completions) == 2 and scores == pytest.approx(length_reward(None, completions))


def test_tokenizer_model_mismatch_is_refused_with_one_line(tmp_path):
    init = tmp_path / "init"
    save_checkpoint("gpt_neox", init)                                 # end-of-text id 0
    with pytest.raises(SystemExit) as e:                              # the task's tokenizer ends texts otherwise
        train.main(run_args(init, tmp_path / "out", "--tokenizer=task"))
    assert str(e.value.code).startswith("error: tokenizer movie_reviews ends texts with id")
    small = tmp_path / "small"
    tok = save_tokenizer(small)
    AutoModelForCausalLM.from_config(make_config("gpt2", len(tok) - 5, tok.eos_token_id)).save_pretrained(small)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(small, tmp_path / "out"))
    assert f"has {len(tok)} tokens but the model only {len(tok) - 5}" in str(e.value.code)
    assert "\n" not in str(e.value.code) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# the device and the precision a run asks for, the memory it logs, its progress lines

def test_the_device_and_the_precision_a_run_asks_for(monkeypatch):
    """--device=auto is the GPU where torch sees one, else the CPU; --device=cpu is the CPU even beside a GPU, and
    --device=cuda without one is refused. --precision=auto is bf16 on a GPU only; bf16 and fp32 are what they say.
    torch.cuda.is_available is set to each answer in turn: no tensor is made on the device."""
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        for asked, expected in (("auto", "cuda" if gpu else "cpu"), ("cpu", "cpu"), ("cuda", "cuda")):
            if asked == "cuda" and not gpu:
                with pytest.raises(ValueError, match="torch finds no CUDA GPU"):
                    model.get_device(train.Config(device=asked))
                continue
            device = model.get_device(train.Config(device=asked))
            assert device.type == expected, (asked, gpu)
            for precision, bf16 in (("auto", expected == "cuda"), ("bf16", True), ("fp32", False)):
                assert model.bf16(train.Config(precision=precision), device) == bf16, (precision, expected)


def test_the_peak_memory_of_a_cpu_run_is_the_processs_own_peak_resident_set(tmp_path):
    """On a CPU, the logged mem_mb is the process's own peak resident set in MiB, what Linux shows as VmHWM (in KiB) in
    /proc/self/status, even when a larger process started it: here a process that holds 1 GiB more than the one it
    starts (whose ru_maxrss would count that GiB)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status: not Linux")
    script = ("import json, torch, model\n"
              "mb = model.peak_memory_mb(torch.device('cpu'))\n"
              "hwm = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) / 1024\n"
              "print(json.dumps([mb, hwm]))\n")
    held = bytearray(2**30)                                            # 1 GiB, each page touched
    held[::4096] = b"\x01" * len(held[::4096])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    del held
    mb, hwm = json.loads(out.stdout)
    assert hwm - 1 <= mb <= hwm and mb < 1024, (mb, hwm)


def test_progress_in_a_log_prints_every_ten_seconds_and_always_the_last_line(capsys, monkeypatch):
    """In a log (not a terminal) status() prints a line at most every 10 seconds, and the last one (done=True) always;
    a process of rank other than 0 prints nothing."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(model, "LAST_STATUS", [time.time()])          # a line was printed just now
    for step in (1, 2, 3):
        model.status(f"step {step}/3", done=step == 3)
    assert capsys.readouterr().out == "step 3/3\n"
    model.LAST_STATUS[0] = time.time() - 11                           # the last line 11 seconds ago
    for step in (1, 2):
        model.status(f"step {step}/3")
    assert capsys.readouterr().out == "step 1/3\n"
    monkeypatch.setenv("RANK", "1")
    model.status("step 3/3", done=True)
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------
# bf16 autocast on a CPU

def test_bf16_keeps_logprobs_values_and_losses_in_fp32(tmp_path):
    lm, tok = save_checkpoint("gpt_neox", tmp_path)
    policy = model.PolicyWithValue(lm, len(tok))
    torch.nn.init.normal_(policy.v_head.weight)
    cfg = train.Config(precision="bf16")
    ids = torch.tensor([tok.encode("the plot was very dull but the cast was charming.")])  # (1, T)
    with model.autocast(cfg, torch.device("cpu")):
        logits, values = policy(ids, torch.ones_like(ids), 3)         # (1, T - 3, V), (1, T - 3)
        out = lm(input_ids=ids, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16                         # autocast did run
    assert logits.dtype == values.dtype == torch.float32
    hidden = out.hidden_states[-1][:, 2:-1].float()                   # (1, T - 3, H) the same states
    torch.testing.assert_close(values, policy.v_head(hidden).squeeze(-1), atol=0, rtol=0)  # the head in fp32
    logprobs = model.token_logprobs(logits, ids[:, 3:])
    assert logprobs.dtype == torch.float32


def test_bf16_run_trains_and_starts_at_ratio_one(tmp_path):
    init, out = tmp_path / "init", tmp_path / "out"
    lm, _ = save_checkpoint("gpt2", init)
    history = train.main(run_args(init, out, "--precision=bf16"))
    print("bf16 first approx_kl", history[0]["approx_kl"])
    assert history[0]["approx_kl"] < 1e-6 and history[0]["clipfrac"] == 0  # bf16: same shapes, same rounding
    assert history[0]["kl"] == 0                                       # policy and pi_init scored alike
    assert all(torch.isfinite(torch.tensor(v)) for r in history for v in r.values())
    trained = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in lm.state_dict().items())


def test_exact_evaluation_runs_with_a_checkpoints_own_tokenizer(tmp_path):
    """The exact evaluator decodes every response with the run's tokenizer, a Hugging Face one too."""
    init = tmp_path / "init"
    save_checkpoint("gpt_neox", init)
    history = train.main(run_args(init, tmp_path / "out", "--max_new_tokens=1", "--exact_every=1"))
    for row in history:                                             # J* and J exactly, gap = J* - J >= 0
        assert row["gap_exact"] == pytest.approx(row["jstar_exact"] - row["J_exact"]) and row["gap_exact"] >= 0


def test_init_without_lr_trains_at_the_pretrained_default_and_says_so(tmp_path, capsys):
    init, out = tmp_path / "init", tmp_path / "out"
    save_checkpoint("gpt_neox", init)
    args = [a for a in run_args(init, out, "--iters=1") if not a.startswith("--lr=")]
    train.main(args)
    assert "| lr 1e-06 |" in capsys.readouterr().out                  # the header states the lr in use
    with open(out / "config.json") as f:
        assert json.load(f)["lr"] == 1e-6


# ----------------------------------------------------------------------------------------------
# LoRA: only adapters train, pi_init is the same network with them off; activation checkpointing

@pytest.mark.parametrize("arch", ARCHS)
def test_lora_pi_init_is_the_untouched_model_and_training_starts_at_it(arch, tmp_path, capsys):
    pytest.importorskip("peft")                                       # an optional extra
    init, out = tmp_path / "init", tmp_path / "out"
    lm, tok = save_checkpoint(arch, init)
    cfg = train.Config(lora_r=4)
    policy = model.PolicyWithValue(lora.with_lora(copy.deepcopy(lm), cfg), len(tok)).eval()
    ref = lora.AdaptersOff(policy.lm)
    assert [p.data_ptr() for p in ref.parameters()] == [p.data_ptr() for p in policy.lm.parameters()]  # one copy
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():                 # adapters that moved
            if "lora_B" in name:
                p.normal_()
        ids = torch.tensor([tok.encode("the plot was very dull but the cast was charming.")])  # (1, T)
        mask = torch.ones_like(ids)
        untouched, _ = model.lm_forward(lm, ids, mask, 3, len(tok))
        off, _ = model.lm_forward(ref, ids, mask, 3, len(tok))
        on, _ = policy(ids, mask, 3)
    assert torch.equal(off, untouched) and not torch.allclose(on, untouched)  # no second copy, no difference
    history = train.main(run_args(init, out, "--lora_r=4", "--iters=2"))
    header = capsys.readouterr().out.splitlines()[0]
    trainable = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n or "v_head" in n)
    assert f"LoRA r 4: {trainable / 1e6:.2f}M of" in header
    assert history[0]["kl"] == 0 and history[0]["approx_kl"] < 1e-9 and history[0]["clipfrac"] == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "policy")     # base + adapters, a plain model
    assert type(merged) is type(lm) and (out / "policy" / "adapter" / "adapter_config.json").exists()
    assert any(not torch.equal(v, merged.state_dict()[k]) for k, v in lm.state_dict().items())
    completions, _ = train.main([f"--sample={out / 'policy'}", "--prompt=hello", "--num_samples=2"])
    assert len(completions) == 2


def test_lora_adapters_sit_on_every_linear_layer_of_gpt2_and_scale_by_alpha_over_r():
    """--lora_targets=all on GPT-2, whose layers are transformers' Conv1D, not nn.Linear: an adapter on each of them
    and on the LM head; each adds B A x scaled by lora_alpha / lora_r."""
    pytest.importorskip("peft")
    cfg = train.Config(lora_r=4, lora_alpha=12.0)
    lm = model.tiny_gpt(cfg, 64)
    adapted = {name for name, m in lora.with_lora(lm, cfg).named_modules() if hasattr(m, "lora_A")}
    layers = {f"{p}.{n}" for p in range(cfg.n_layer) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {name.split("transformer.h.")[-1] for name in adapted if "transformer.h." in name} == layers
    assert any(name.endswith("lm_head") for name in adapted) and len(adapted) == len(layers) + 1
    peft_lm = lora.with_lora(model.tiny_gpt(cfg, 64), cfg)
    head = next(m for name, m in peft_lm.named_modules() if name.endswith("lm_head"))
    x = torch.randn(3, cfg.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.lora_B["default"].weight.normal_()
        delta = head(x) - head.base_layer(x)                          # the adapter's part
        expected = 12.0 / 4 * head.lora_B["default"](head.lora_A["default"](x))
    torch.testing.assert_close(delta, expected)


def test_the_cpu_threads_of_a_run():
    """One thread for the tiny GPT on a CPU (faster beside other busy processes), --threads when given, and torch's
    own choice for a model of your own (--init) or on a GPU."""
    before = torch.get_num_threads()
    try:
        for cfg, device, expected in ((train.Config(), "cpu", 1), (train.Config(threads=3), "cpu", 3),
                                      (train.Config(init="m"), "cpu", 7), (train.Config(), "cuda", 7),
                                      (train.Config(init="m", threads=2), "cpu", 2)):
            torch.set_num_threads(7)                                  # torch's own choice, say
            model.set_cpu_threads(cfg, torch.device(device))
            assert torch.get_num_threads() == expected, (cfg.threads, cfg.init, device)
    finally:
        torch.set_num_threads(before)


def test_frozen_pi_init_is_stored_in_bf16_only_where_that_rounds_nothing():
    """A bf16 run keeps pi_init's frozen weights in bf16 to halve their memory, but only a checkpoint whose weights
    bf16 holds exactly (a bf16 checkpoint): an fp32 one would be rounded, and the first KL would not be 0."""
    cfg, cpu = train.Config(precision="bf16"), torch.device("cpu")
    fp32 = model.tiny_gpt(train.Config(), 64)
    exact = copy.deepcopy(fp32)
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.to(torch.bfloat16))                             # values that bf16 holds exactly
    _, ref_lm = lora.make_policy(train.Config(precision="fp32"), copy.deepcopy(exact), 64, cpu)
    assert {p.dtype for p in ref_lm.parameters()} == {torch.float32}  # an fp32 run keeps fp32
    for lm, stored in ((fp32, torch.float32), (exact, torch.bfloat16)):
        policy, ref_lm = lora.make_policy(cfg, lm, 64, cpu)
        assert {p.dtype for p in ref_lm.parameters()} == {stored}
        assert {p.dtype for p in policy.parameters()} == {torch.float32}  # what trains stays fp32


@pytest.mark.parametrize("algo", ["apa", "grpo"])
def test_make_policy_builds_what_the_config_asks(algo):
    """lab/lora.py: make_policy: a trainable copy of pi_init (pi_init itself frozen and untouched), a value head at 0 that
    trains only where the algorithm has a critic, activation checkpointing on the layers only when asked, and the
    tokenizer's vocabulary, which the rollout and the held-out evaluation cut every logit to (pi_init's too)."""
    cpu, lm = torch.device("cpu"), model.tiny_gpt(train.Config(), 64)
    before = copy.deepcopy(lm.state_dict())
    for asked in (False, True):
        policy, ref_lm = lora.make_policy(train.Config(algo=algo, grad_checkpointing=asked), lm, 64, cpu)
        assert ref_lm is lm and not any(p.requires_grad for p in ref_lm.parameters()) and not ref_lm.training
        assert policy.n_vocab == 64
        assert all(p.requires_grad for p in policy.lm.parameters()) and policy.lm is not lm
        assert all(torch.equal(v, before[k]) for k, v in policy.lm.state_dict().items())  # a copy of pi_init
        head = list(policy.v_head.parameters())
        assert all(torch.count_nonzero(p) == 0 and p.requires_grad == (algo == "apa") for p in head)
        flags = {getattr(m, "gradient_checkpointing", False) for m in policy.lm.modules()}
        assert (True in flags) == asked and not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())


def test_the_optimizer_is_adam_at_lr_over_every_weight_that_trains():
    """model.make_optimizer on APA's policy: Adam at the run's lr over the network and the value head. Adam's first
    step moves each weight by -lr g / (|g| + eps), g its gradient (after bias correction its moments are g and g^2)."""
    lr, eps = 1e-3, 1e-8
    torch.manual_seed(0)
    policy, _ = lora.make_policy(train.Config(algo="apa"), model.tiny_gpt(train.Config(), 64), 64, torch.device("cpu"))
    opt = model.make_optimizer(policy, lr, torch.device("cpu"))
    ids = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, P + T), P = 4
    logits, values = policy(ids, torch.ones_like(ids), 4)                # (B, T, V), (B, T)
    (model.token_logprobs(logits, ids[:, 4:]).sum() + values.sum()).backward()
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    opt.step()
    assert policy.v_head.weight.grad.count_nonzero() > 0                 # the value head has a step to take
    for name, p in policy.named_parameters():
        step = -lr * p.grad / (p.grad.abs() + eps)
        torch.testing.assert_close(p.detach() - before[name], step, atol=1e-7, rtol=1e-3, msg=name)


def test_static_sampler_under_lora_draws_what_the_eager_loop_draws(tmp_path):
    """The GPU's sampler path (without its graph) through peft's model, and through pi_init as the same network
    with its adapters off: the eager loop's tokens under one seed, and its log-probs."""
    pytest.importorskip("peft")                                       # an optional extra
    lm, tok = save_checkpoint("gpt_neox", tmp_path)
    policy, ref_lm = lora.make_policy(train.Config(lora_r=4), lm, len(tok), torch.device("cpu"))
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)                                     # adapters that change what the policy draws
    ids, mask = model.left_pad([tok.encode("the plot"), tok.encode("the music was very")] * 4, tok.eos_token_id,
                                 torch.device("cpu"))
    draws = []
    for lm in (policy.lm, ref_lm):
        torch.manual_seed(0)
        eager = model.generate(lm, ids, mask, 10, tok.eos_token_id, len(tok))
        torch.manual_seed(0)
        static = static_sampler.generate_static(lm, ids, mask, 10, tok.eos_token_id, len(tok), graph=False)
        assert torch.equal(static[0], eager[0])
        torch.testing.assert_close(static[2], eager[2], atol=1e-5, rtol=1e-5)
        draws.append(static[0])
    assert not torch.equal(draws[0], draws[1])                        # the adapters were on, then off


def test_lora_in_bf16_keeps_its_frozen_weights_in_bf16_and_starts_at_ratio_one(tmp_path):
    pytest.importorskip("peft")
    init, out = tmp_path / "init", tmp_path / "out"
    save_checkpoint("gpt_neox", init)
    history = train.main(run_args(init, out, "--lora_r=4", "--precision=bf16", "--ckpt_every=1"))
    assert history[0]["kl"] == 0 and history[0]["approx_kl"] < 1e-9
    state = torch.load(out / "ckpt.pt", weights_only=False)["policy"]   # what trains, in fp32; the base is not saved
    assert state and all(("lora_" in k or k.startswith("v_head")) and v.dtype == torch.float32 for k, v in state.items())


def test_lora_without_peft_is_one_line(tmp_path, monkeypatch):
    init = tmp_path / "init"
    save_checkpoint("gpt2", init)
    monkeypatch.setitem(sys.modules, "peft", None)                    # import peft raises ImportError
    with pytest.raises(SystemExit) as e:
        train.main(run_args(init, tmp_path / "out", "--lora_r=4"))
    assert e.value.code == "error: --lora_r needs peft, an optional extra: pip install peft"


def test_activation_checkpointing_recomputes_and_changes_no_gradient(tmp_path):
    lm, tok = save_checkpoint("llama", tmp_path)
    ids = torch.tensor([tok.encode("the plot was very dull but the cast was charming.")] * 2)  # (2, T)
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)                                          # the same value head
        policy = model.PolicyWithValue(copy.deepcopy(lm), len(tok)).eval()
        if checkpointing:
            lora.checkpoint_activations(policy.lm)
        policy.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(checkpointing))  # (the
        # recomputation stops once it has what the backward pass needs: the hook after it may not run)
        logits, values = policy(ids, torch.ones_like(ids), 3)
        (model.token_logprobs(logits, ids[:, 3:]).sum() + values.sum()).backward()
        grads.append([p.grad for p in policy.parameters()])
    assert calls == [False, True, True]                               # the layer ran again in the backward pass
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_changes_no_sampled_token(arch, tmp_path):
    """transformers drops a checkpointing layer's KV cache; the sampler runs those layers in eval mode, so that
    it draws the tokens it draws without checkpointing (GPT-2 did not), and leaves them in training mode for the
    update to recompute."""
    lm, tok = save_checkpoint(arch, tmp_path)
    ids, mask = model.left_pad([tok.encode("the plot"), tok.encode("the music was very")] * 4, tok.eos_token_id,
                               torch.device("cpu"))
    draws = []
    for checkpointing in (False, True):
        policy = copy.deepcopy(lm)
        if checkpointing:
            lora.checkpoint_activations(policy)
        torch.manual_seed(0)
        draws.append(model.generate(policy, ids, mask, 8, tok.eos_token_id, len(tok)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][2], draws[1][2])
    assert any(getattr(m, "gradient_checkpointing", False) and m.training for m in policy.modules())


# ----------------------------------------------------------------------------------------------
# what only a real checkpoint has: added tokens, an end-of-text of its own, a reward model with its own tokenizer,
# pad id and two outputs, and hub ids

def save_added_tokens_tokenizer(path):
    """The BPE above with two tokens added beyond its 300, as Llama-style and chat checkpoints have them: the
    end-of-text '</s>' (id 300; GPT-2's '<|endoftext|>' stays an ordinary token, id 0) and a pad token (301)."""
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe())
    fast.add_special_tokens({"eos_token": "</s>", "pad_token": "<pad>"})
    assert (fast.vocab_size, len(fast), fast.eos_token_id, fast.pad_token_id) == (300, 302, 300, 301)
    fast.save_pretrained(path)
    return fast


def save_reward_model(path, config_pad=None):
    """A tiny GPT-2 sequence classifier with two outputs (a sentiment classifier's negative and positive) and its
    own tokenizer, whose pad id (301) is no policy's end-of-text; its config names no pad id, as many do, or
    config_pad."""
    tok = save_added_tokens_tokenizer(path)
    torch.manual_seed(1)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                                  num_labels=2, bos_token_id=tok.eos_token_id,
                                                  eos_token_id=tok.eos_token_id, pad_token_id=config_pad))
    rm.save_pretrained(path)
    return rm.eval(), tok


def hub_cache(tmp_path, monkeypatch):
    """A folder laid out as the Hugging Face cache (models--org--name/snapshots/<commit>, refs/main), with the hub
    offline: a hub id resolves there as a model downloaded before, without the network, through the real path of
    a hub id (the cache lookup of lab/hf.py's check_source, ships_tokenizer, transformers' from_pretrained). Only
    huggingface_hub's own settings are patched, not a function of ours. Returns the folder of a hub id."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def snapshot(repo_id):
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        return repo / "snapshots" / ("0" * 40)
    return snapshot


def scores_alone(rm, tok, prompts, completions):
    """The slow reward: each text alone through the reward model (no padding), its last logit."""
    with torch.no_grad():
        return [rm(input_ids=torch.tensor([tok.encode(p + c)])).logits[0, -1].item()
                for p, c in zip(prompts, completions)]


PROMPTS = ["the plot", "the music was very", "the"]
COMPLETIONS = [" was dull.", " charming and the cast was superb.", " end"]


def test_a_hugging_face_tokenizer_reads_and_writes_text_as_tiktoken_does(tmp_path):
    """HFTokenizer answers as tiktoken's Encoding: encode_ordinary adds no special token (this tokenizer starts each
    text it encodes with '<s>'); decode writes a special token as its text, as tiktoken writes '<|endoftext|>'; and
    decode_batch decodes each row as decode does, special tokens and each space kept."""
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe())
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", fast.bos_token_id)])
    fast.save_pretrained(tmp_path)
    enc, text = hf.HFTokenizer(str(tmp_path)), "the plot , the cast 's music was dull ."
    assert fast.encode(text)[0] == fast.bos_token_id                  # what encode_ordinary must not do
    ids = enc.encode_ordinary(text)
    assert fast.bos_token_id not in ids and enc.decode(ids) == text
    assert enc.decode(ids + [enc.eot_token]) == text + "</s>"
    batch = [ids, enc.encode_ordinary(" charming."), ids[:3] + [enc.eot_token]]
    assert enc.decode_batch(batch) == [enc.decode(x) for x in batch] and enc.decode_batch(batch)[0] == text


def test_a_tokenizer_with_added_tokens_and_an_end_of_text_of_its_own(tmp_path):
    """A run's end-of-text is the tokenizer's eos ('</s>' here, not GPT-2's '<|endoftext|>'), and its vocabulary
    counts the added tokens: the sampler can draw end-of-text, so responses end, and --init trains a model whose
    config lists several end-of-text ids, as Llama 3's does."""
    init = tmp_path / "init"
    tok = save_added_tokens_tokenizer(init)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(make_config("llama", len(tok), tok.eos_token_id)).eval()
    lm.config.eos_token_id = [tok.pad_token_id, tok.eos_token_id]
    lm.save_pretrained(init)
    enc = hf.HFTokenizer(str(init))
    assert (enc.eot_token, enc.n_vocab) == (300, 302)
    ids, mask = model.left_pad([enc.encode_ordinary(p) for p in PROMPTS] * 4, enc.eot_token, torch.device("cpu"))
    torch.manual_seed(0)
    _, resp_mask, _ = model.generate(likely_eot(copy.deepcopy(lm), enc.eot_token, 8.0), ids, mask, 12, enc.eot_token,
                                     enc.n_vocab)
    assert (resp_mask.sum(1) < 12).all()                              # every response drew end-of-text and ended
    history = train.main(run_args(init, tmp_path / "out"))
    assert len(history) == 2 and history[0]["kl"] == 0 and history[0]["approx_kl"] < 1e-9


@pytest.mark.parametrize("config_pad", [None, 300], ids=["config without a pad id", "config pads with eos"])
def test_a_reward_model_scores_with_its_own_tokenizer_and_pad_id_and_its_last_logit(config_pad, tmp_path):
    """Texts of different lengths, padded in one batch by the reward model's own tokenizer, score as each alone: the
    model finds each text's last token by the id its tokenizer pads with (not the policy's end-of-text, nor another
    id its config names), and the score is the last logit (a two-class classifier's 'positive')."""
    rm, tok = save_reward_model(tmp_path / "rm", config_pad)
    enc = data.task_encoding()                                        # the policy's: end-of-text 302, no pad
    score = hf.reward_model_fn(str(tmp_path / "rm"), enc, torch.device("cpu"))
    assert score(PROMPTS, COMPLETIONS) == pytest.approx(scores_alone(rm, tok, PROMPTS, COMPLETIONS), abs=1e-5)


def test_an_encoder_reward_model_whose_tokenizer_has_no_end_of_text(tmp_path):
    """An encoder as reward model (BERT, DeBERTa: '[CLS] text [SEP]', padded with '[PAD]') ships a tokenizer without
    an end-of-text; it pads with its pad token, and scores each text as alone."""
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe())
    fast.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", fast.cls_token_id), ("[SEP]", fast.sep_token_id)])
    fast.save_pretrained(tmp_path / "rm")
    assert fast.eos_token is None and fast.encode("the")[0] == fast.cls_token_id
    torch.manual_seed(3)
    rm = BertForSequenceClassification(BertConfig(vocab_size=len(fast), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=1,
                                                  pad_token_id=fast.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    score = hf.reward_model_fn(str(tmp_path / "rm"), data.task_encoding(), torch.device("cpu"))
    assert score(PROMPTS, COMPLETIONS) == pytest.approx(scores_alone(rm, fast, PROMPTS, COMPLETIONS), abs=1e-5)


def test_a_reward_model_without_a_tokenizer_scores_the_policys_tokens_the_last_that_fit(tmp_path):
    """A reward model folder without a tokenizer reads the policy's tokens: a batch padded with the policy's
    end-of-text scores as each text alone, and a text longer than the model's context window is scored on its last
    tokens, those of the completion."""
    enc = data.task_encoding()
    torch.manual_seed(2)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=enc.n_vocab, n_positions=12, n_embd=32, n_layer=1,
                                                  n_head=2, num_labels=1, bos_token_id=enc.eot_token,
                                                  eos_token_id=enc.eot_token))
    rm.eval().save_pretrained(tmp_path / "rm")
    completions = COMPLETIONS[:2] + [" was dull and the cast was weak but the music was charming."]
    ids = [enc.encode_ordinary(p + c) for p, c in zip(PROMPTS, completions)]
    assert [len(x) > 12 for x in ids] == [False, False, True] and len(ids[0]) < len(ids[1])
    with torch.no_grad():
        alone = [rm(input_ids=torch.tensor([x[-12:]])).logits[0, -1].item() for x in ids]
    score = hf.reward_model_fn(str(tmp_path / "rm"), enc, torch.device("cpu"))
    assert score(PROMPTS, completions) == pytest.approx(alone, abs=1e-5)


def test_init_without_a_tokenizer_is_read_with_gpt2s_bpe(tmp_path):
    """A checkpoint saved without a tokenizer (a GPT-2 fine-tune saved by save_pretrained alone) is read with GPT-2's
    BPE: its 50,257 tokens and its end-of-text, 50256, which the model's config names."""
    try:
        data.get_encoding("gpt2")
    except Exception as e:                                            # no tiktoken cache and no network
        pytest.skip(f"GPT-2 BPE unavailable offline ({type(e).__name__})")
    init = tmp_path / "init"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(init)
    history = train.main(run_args(init, tmp_path / "out", "--iters=1"))
    assert len(history) == 1 and history[0]["kl"] == 0 and not (tmp_path / "out" / "policy" / "tokenizer.json").exists()


def test_a_hub_id_brings_its_own_tokenizer_to_the_policy_and_the_reward_model(tmp_path, monkeypatch):
    """--init=org/lm and --reward_model=org/rm, hub ids (from a hub cache, offline): each is read with the tokenizer
    it ships, not GPT-2's BPE for the policy, nor the policy's tokenizer for the reward model."""
    snapshot = hub_cache(tmp_path, monkeypatch)
    save_checkpoint("gpt_neox", snapshot("org/lm"))
    rm, tok = save_reward_model(snapshot("org/rm"))
    history = train.main(run_args("org/lm", tmp_path / "out", "--reward_model=org/rm"))
    assert len(history) == 2 and (tmp_path / "out" / "policy" / "tokenizer.json").exists()  # it ran on its own
    score = hf.reward_model_fn("org/rm", hf.HFTokenizer("org/lm"), torch.device("cpu"))
    assert score(PROMPTS, COMPLETIONS) == pytest.approx(scores_alone(rm, tok, PROMPTS, COMPLETIONS), abs=1e-5)


def test_lora_targets_are_module_names_separated_by_commas():
    pytest.importorskip("peft")
    cfg = train.Config(lora_r=4, lora_targets="c_attn,c_proj")
    lm = lora.with_lora(model.tiny_gpt(cfg, 64), cfg)
    adapted = {name.split("transformer.h.")[-1] for name, m in lm.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"{i}.{n}" for i in range(cfg.n_layer) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
