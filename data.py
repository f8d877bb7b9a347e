"""
The data of the RLHF loop: the embedded movie-review task (a corpus to pre-train pi_init, prompts, held-out
prompts, a sentiment reward), its tokenizer, and loaders for your own prompts and reward functions.

The embedded task needs no download. A small grammar writes reviews of one to three clauses, "the plot was very
dull but the cast was charming." Its adjectives are positive, negative or neutral in equal measure, so pi_init
(pre-trained on the grammar) is neutral on average. A prompt is an opening "the <subject> <verb>", and the policy
completes the review. The reward counts positive minus negative adjectives and saturates:
score = clip(pos - neg, -2, 2) / 2, in [-1, 1]. Thousands of completions reach the top score, so the optimum
pi* = pi_init exp(R/lambda) / Z stays diverse instead of collapsing onto one string.

Tokenizers answer to six names of tiktoken's Encoding: encode_ordinary, decode, decode_batch, eot_token, n_vocab,
name. The task's is a tiktoken Encoding over the 256 bytes plus one token per word of the grammar; "gpt2" is
GPT-2's BPE (tiktoken's r50k_base, read from TIKTOKEN_CACHE_DIR offline); a checkpoint's own comes from lab/hf.py,
which train.py calls: this file imports nothing from lab/.
"""
import importlib
import json
import random

import numpy as np
import tiktoken
import torch


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
    (A Hugging Face tokenizer, a folder or hub id, is lab/hf.py's HFTokenizer.)"""
    if name == "task":
        return task_encoding()
    if name == "gpt2":
        return tiktoken.get_encoding("r50k_base")
    raise ValueError(f"tokenizer {name!r}: data.get_encoding knows 'task' and 'gpt2'")


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


def distinct_n(texts, n):
    """Unique n-grams / all n-grams of words and full stops over a batch of texts (Li et al. 2016):
    1.0 when nothing repeats, low under mode collapse."""
    grams = [tuple(w[i:i + n]) for w in (t.replace(".", " .").split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


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


def load_reward_fn(spec, what="reward function"):
    """'module:function', a Python function (prompts, completions) -> one float per completion. what names it in
    the message of a failure (the judge: "gold function")."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] and e.name != module:          # the module was found; its own import failed
            raise ValueError(f"importing {module} for {what} {spec!r} failed: {e}") from e
        raise ValueError(f"{what} {spec!r} not found: no module {module!r} (expected 'module:function')") from None
    except (AttributeError, ValueError):
        raise ValueError(f"{what} {spec!r} not found (expected 'module:function')") from None
    except (Exception, SystemExit) as e:                                 # the module's own code failed at import
        raise ValueError(f"importing {module} for {what} {spec!r} raised {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from e
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def load_train_prompts(cfg, enc):
    """The prompts that RL trains on (text and tokens): --prompts, else the task's openings."""
    prompts = load_prompts(cfg.prompts) if cfg.prompts else task_prompts()
    return prompts, [enc.encode_ordinary(p) for p in prompts]


def load_eval_prompts(cfg, enc):
    """The held-out prompts (text and tokens), never trained on: --eval_prompts, else the task's held-out openings
    (none with --prompts, or with eval_every 0)."""
    prompts = ((load_prompts(cfg.eval_prompts) if cfg.eval_prompts else [] if cfg.prompts else task_eval_prompts())
               if cfg.eval_every else [])
    return prompts, [enc.encode_ordinary(p) for p in prompts]


def call_reward(cfg, reward_fn, prompts, completions, name=None):
    """The scores (B,) of the user's reward function or model (or of the judge, name: "gold function ..."); whatever
    goes wrong, one line that names it."""
    name = name or (f"reward model {cfg.reward_model}" if cfg.reward_model else f"reward function {cfg.reward_fn}")
    try:
        scores = reward_fn(prompts, completions)
    except (Exception, SystemExit) as e:                                 # sys.exit() in it is a failure too
        raise ValueError(f"{name} raised {type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)") from e
    return check_scores(scores, len(completions), name)


def check_scores(scores, n, name="reward function"):
    """The scores (n,) of n completions: one number each, as a list or a tensor of shape (n,) or (n, 1)."""
    if not isinstance(scores, (list, tuple, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} returned a {type(scores).__name__}: expected a list of {n} floats")
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).cpu()
    except OverflowError as e:                                           # an int beyond any float: 10**400
        raise ValueError(f"{name} returned a score too large for a float ({e})") from None
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} returned {str(scores)[:80]}: expected a list of {n} floats") from None
    if scores.shape == (n, 1):                                           # one column: a score a row
        scores = scores[:, 0]
    if scores.shape != (n,):                                             # (2, n/2) would score the wrong rows
        raise ValueError(f"{name} returned {tuple(scores.shape)} scores for {n} completions: expected ({n},) or "
                         f"({n}, 1)")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} returned non-finite scores: {scores[~torch.isfinite(scores)].tolist()[:5]}")
    return scores
