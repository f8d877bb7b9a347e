"""
Data for the RLHF runs: tokenizers (tiktoken), the embedded movie-review task (a corpus to pre-train
pi_init, prompts, a sentiment reward), and loaders for your own prompts and reward models.

The embedded task needs no download. A small grammar writes one-to-three-clause movie reviews,
"the plot was very dull but the cast was charming." Its adjectives are positive, negative or
neutral in equal measure, so pi_init (pre-trained on the grammar) is neutral on average. Prompts are
the opening "the <subject> <verb>"; the policy completes the review. The reward counts positive
minus negative adjectives in the completion and saturates: score = clip(pos - neg, -2, 2) / 2 in
[-1, 1]. Thousands of different completions reach the top score, so the KL-regularised optimum
pi* = pi_init exp(R/lambda)/Z stays diverse instead of collapsing onto one string.

Tokenizers: `task_encoding()` is a tiktoken Encoding over the 256 bytes, the task's words as whole
tokens, and <|endoftext|>: any text encodes, and the task's reviews take one token per word.
`get_encoding("gpt2")` gives GPT-2's BPE for GPT-2 checkpoints; it is tiktoken's `r50k_base` (the
same ids), downloaded once by tiktoken or read from TIKTOKEN_CACHE_DIR. A checkpoint's own tokenizer
(Pythia's, Llama's, ...) is read from its folder by `transformers.AutoTokenizer` and wrapped in
`HFTokenizer`, which answers to the same five names as a tiktoken Encoding: encode_ordinary, decode,
eot_token, n_vocab, name.
"""
import importlib
import json
import os
import random

import numpy as np
import tiktoken
import torch

from common import one_line

# ---------------------------------------------------------------------------------------------
# the embedded task

SUBJECTS = ["movie", "film", "plot", "story", "acting", "cast", "script", "ending", "music", "dialogue"]
VERBS = ["was", "is", "felt", "seemed"]
ADVERBS = ["very", "really", "quite", "truly"]
POSITIVE = ["great", "wonderful", "brilliant", "beautiful", "moving", "funny", "charming", "superb"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "bad", "clumsy", "painful"]
NEUTRAL = ["long", "short", "loud", "quiet", "simple", "strange", "slow", "familiar"]
EOT = "<|endoftext|>"


def task_encoding():
    """Byte-level tiktoken Encoding plus one token per word of the task's grammar, plus <|endoftext|>."""
    words = ["the", "and", "but"] + SUBJECTS + VERBS + ADVERBS + POSITIVE + NEGATIVE + NEUTRAL
    ranks = {bytes([i]): i for i in range(256)}
    for w in ["the"] + [" " + w for w in words]:
        ranks[w.encode()] = len(ranks)
    # a piece that is a whole token is taken as is; any other text falls back to its bytes
    return tiktoken.Encoding(name="movie_reviews", pat_str=r" ?[a-z]+| ?[^\sa-z]+|\s+",
                             mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def get_encoding(name):
    """'task': the embedded task's tokenizer. 'gpt2': GPT-2's BPE (tiktoken's r50k_base, same ids).
    Anything else: a Hugging Face tokenizer (a folder or hub id), read by AutoTokenizer."""
    if name == "task":
        return task_encoding()
    if name == "gpt2":
        return tiktoken.get_encoding("r50k_base")
    return HFTokenizer(name)


def check_source(flag, name, tokenizer=False):
    """A model or tokenizer that is no local path is a Hugging Face hub id. Refuse at once, in one line, one that
    cannot be had (not in the local Hugging Face cache, and the hub says no or cannot be reached), instead of
    transformers' minute of retries and a message that blames the network for a typo."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    if os.path.exists(name):
        return
    kinds = "'task', 'gpt2', a folder with a tokenizer or a Hugging Face hub id" if tokenizer else \
        "a model folder or a Hugging Face hub id"
    try:
        files = ("tokenizer_config.json", "tokenizer.json") if tokenizer else ("config.json",)
        if any(isinstance(huggingface_hub.try_to_load_from_cache(name, f), str) for f in files):
            return                                                       # downloaded before
        huggingface_hub.model_info(name, timeout=10)                    # one request, no retries
    except HFValidationError:
        raise ValueError(f"{flag}={name} is no folder here and no hub id: {flag} takes {kinds}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag}={name} is no folder here, and the Hugging Face hub has no such model (or it is "
                         f"private or gated: log in); {flag} takes {kinds}") from None
    except Exception as e:                                               # no network, HF_HUB_OFFLINE, a timeout
        raise ValueError(f"{flag}={name} is no folder here nor in the Hugging Face cache, and the hub cannot be "
                         f"reached to look it up ({type(e).__name__}: {one_line(e, 120)}); "
                         f"{flag} takes {kinds}") from None


def ships_tokenizer(path):
    """Whether a Hugging Face model folder (or hub id: assumed yes) holds a tokenizer of its own."""
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in
                                          ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


class HFTokenizer:
    """A transformers tokenizer behind the part of tiktoken's Encoding that training uses. Its
    end-of-text is the tokenizer's eos token; n_vocab counts added tokens too (ids 0 .. n_vocab - 1)."""

    def __init__(self, path):
        from transformers import AutoTokenizer
        from model import quiet
        if os.path.isdir(path) and not ships_tokenizer(path):
            raise ValueError(f"{path} holds no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)")
        try:
            with quiet():
                self.tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:                                           # a damaged tokenizer.json raises anything
            raise ValueError(f"cannot load a tokenizer from {path}: {one_line(e, 300)}") from None
        if self.tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {path} has no end-of-text (eos) token")
        self.name, self.eot_token, self.n_vocab = os.path.basename(os.path.normpath(path)), self.tok.eos_token_id, len(self.tok)

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids)

    def decode_batch(self, batch):
        return self.tok.batch_decode(batch)


def review(rng):
    """One review from the grammar, e.g. 'the film felt quite boring and the music was superb.'"""
    clauses = []
    for _ in range(rng.choices([1, 2, 3], weights=[0.4, 0.4, 0.2])[0]):
        adjective = rng.choice(rng.choice([POSITIVE, NEGATIVE, NEUTRAL]))
        adverb = rng.choice(ADVERBS) + " " if rng.random() < 0.3 else ""
        clauses.append(f"the {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adverb}{adjective}")
    text = clauses[0]
    for clause in clauses[1:]:
        text += f" {rng.choice(['and', 'but'])} {clause}"
    return text + "."


def task_corpus(n, seed=0):
    """n reviews for pre-training pi_init (the SFT step)."""
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def task_prompts():
    """The 40 openings 'the <subject> <verb>'."""
    return [f"the {s} {v}" for s in SUBJECTS for v in VERBS]


def task_eval_prompts():
    """40 held-out openings that RL never trains on: 'the <subject> <verb> <adverb>', each (subject, verb) once."""
    return [f"{p} {ADVERBS[(i + i // len(VERBS)) % len(ADVERBS)]}" for i, p in enumerate(task_prompts())]


def sentiment_reward(prompts, completions):
    """The embedded task's reward: clip(#positive - #negative adjectives in the completion, -2, 2) / 2."""
    positive, negative = set(POSITIVE), set(NEGATIVE)
    scores = []
    for completion in completions:
        words = completion.replace(".", " ").split()
        net = sum(w in positive for w in words) - sum(w in negative for w in words)
        scores.append(max(-2, min(2, net)) / 2)
    return scores


# ---------------------------------------------------------------------------------------------
# your own prompts and rewards

def load_prompts(path):
    """Prompts from a file: .jsonl with one {"prompt": "..."} per line, or text with one per line."""
    if path.endswith(".json"):
        raise ValueError(f'prompts file {path} is .json: give a .jsonl file (one {{"prompt": "..."}} a line) '
                         "or a text file (one prompt a line)")
    try:
        with open(path, encoding="utf-8-sig") as f:                     # a byte-order mark is not text;
            lines = [line.rstrip("\n") for line in f]                   # \r\n reads as \n
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    prompt = json.loads(line)["prompt"]
                except (ValueError, KeyError, TypeError, IndexError):
                    prompt = None
                if not isinstance(prompt, str):
                    raise ValueError(f'{path}:{i}: expected a JSON object with a "prompt" string')
                prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt")
    return prompts


def load_reward_fn(spec):
    """'module:function', a Python function (prompts, completions) -> one float per completion."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] and e.name != module:          # the module was found; its own import failed
            raise ValueError(f"importing {module} for reward function {spec!r} failed: {e}") from e
        raise ValueError(f"reward function {spec!r} not found: no module {module!r} (expected 'module:function')") from None
    except (AttributeError, ValueError):
        raise ValueError(f"reward function {spec!r} not found (expected 'module:function')") from None
    except (Exception, SystemExit) as e:                                 # the module's own code failed at import
        raise ValueError(f"importing {module} for reward function {spec!r} raised {type(e).__name__}: "
                         f"{one_line(e, 200)}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def reward_model_fn(path, enc, device):
    """A Hugging Face sequence-classification model as reward: the last logit of prompt + completion
    (a single-logit reward model's score, or the 'positive' class of a two-class sentiment model).
    Text is tokenized by the model's own tokenizer when it has one, else by `enc` (the policy's)."""
    from transformers import AutoModelForSequenceClassification
    from model import load_pretrained
    model = load_pretrained(AutoModelForSequenceClassification, path, "reward model",  # a causal LM's score
                            ": not a sequence-classification model (a causal LM? that goes in --init)").to(device).eval()
    tokenizer = HFTokenizer(path).tok if ships_tokenizer(path) else None
    if tokenizer is not None:
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if model.config.pad_token_id is None:                               # it finds each text's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer else enc.eot_token
    pad_id = model.config.pad_token_id

    @torch.no_grad()
    def score(prompts, completions):
        texts = [p + c for p, c in zip(prompts, completions)]
        if tokenizer is not None:
            batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        else:
            ids = [enc.encode_ordinary(t)[-model.config.max_position_embeddings:] or [pad_id] for t in texts]
            width = max(map(len, ids))
            batch = {"input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device),
                     "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)}
        return model(**batch).logits[:, -1].float().tolist()
    return score


def load_data(cfg, device):
    """The run's tokenizer (with --init: the checkpoint's own), prompts (text and tokens) and reward function."""
    enc = get_encoding(cfg.tokenizer or ("task" if not cfg.init else cfg.init if ships_tokenizer(cfg.init)
                                              else "gpt2"))
    prompts = load_prompts(cfg.prompts) if cfg.prompts else task_prompts()
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    reward_fn = (reward_model_fn(cfg.reward_model, enc, device) if cfg.reward_model
                 else load_reward_fn(cfg.reward_fn))
    return enc, prompts, prompt_tokens, reward_fn


def call_reward(cfg, reward_fn, prompts, completions):
    """The scores (B,) of the user's reward function or model; whatever goes wrong, one line that names it."""
    name = f"reward model {cfg.reward_model}" if cfg.reward_model else f"reward function {cfg.reward_fn}"
    try:
        scores = reward_fn(prompts, completions)
    except (Exception, SystemExit) as e:                                 # sys.exit() in it is a failure too
        raise ValueError(f"{name} raised {type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)") from e
    return check_scores(scores, len(completions), name)


def check_scores(scores, n, name="reward function"):
    if not isinstance(scores, (list, tuple, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} returned a {type(scores).__name__}: expected a list of {n} floats")
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} returned {str(scores)[:80]}: expected a list of {n} floats") from None
    if scores.shape != (n,):
        raise ValueError(f"{name} returned {tuple(scores.shape)} scores for {n} completions")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} returned non-finite scores: {scores[~torch.isfinite(scores)].tolist()[:5]}")
    return scores
