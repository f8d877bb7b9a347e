"""
Hugging Face checkpoints, checked: a causal LM as pi_init (--init), a reward model (--reward_model), a checkpoint's
own tokenizer (HFTokenizer), and hub ids. Each is refused in one line that says what is wrong (damaged, lacking
weights, not causal, not on the hub) instead of transformers' reports; docs/runs.md lists the checks.
"""
import contextlib
import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from data import get_encoding
from lab.cli import one_line
from model import right_pad


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


def load_lm(path, what):
    """A causal LM from a Hugging Face folder or hub id, in fp32, refused in one line if it is damaged, lacks
    weights (its LM head would be random) or is no causal model."""
    lm = load_pretrained(AutoModelForCausalLM, path, what)
    check_causal(lm, f"{what} {path}")
    return lm


def load_config(path):
    """The Hugging Face config of --init, read before its weights."""
    try:
        with quiet():
            return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"--init {path} holds no model: {one_line(e, 200)}") from None


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


def load_tokenizer(cfg):
    """The run's tokenizer: --tokenizer ("task", "gpt2", or a Hugging Face one); else --init's own (GPT-2's BPE
    when the checkpoint ships none); else the embedded task's."""
    name = cfg.tokenizer or ("task" if not cfg.init else cfg.init if ships_tokenizer(cfg.init) else "gpt2")
    return get_encoding(name) if name in ("task", "gpt2") else HFTokenizer(name)


def auto_tokenizer(path):
    """The transformers tokenizer of a Hugging Face folder or hub id, or a ValueError that says what is wrong."""
    from transformers import AutoTokenizer
    if os.path.isdir(path) and not ships_tokenizer(path):
        raise ValueError(f"{path} holds no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)")
    try:
        with quiet():
            return AutoTokenizer.from_pretrained(path)
    except Exception as e:                                               # a damaged tokenizer.json raises anything
        raise ValueError(f"cannot load a tokenizer from {path}: {one_line(e, 300)}") from None


class HFTokenizer:
    """A transformers tokenizer behind the part of tiktoken's Encoding that training uses (encode_ordinary, decode,
    decode_batch, eot_token, n_vocab, name). Its end-of-text is the tokenizer's eos token; n_vocab counts added
    tokens too."""

    def __init__(self, path):
        self.tok = auto_tokenizer(path)
        if self.tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {path} has no end-of-text (eos) token")
        self.name, self.eot_token, self.n_vocab = os.path.basename(os.path.normpath(path)), self.tok.eos_token_id, len(self.tok)

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids)

    def decode_batch(self, batch):
        return self.tok.batch_decode(batch)


def reward_model_fn(path, enc, device):
    """A Hugging Face sequence-classification model as reward: the last logit of prompt + completion
    (a single-logit reward model's score, or the 'positive' class of a two-class sentiment model).
    Text is tokenized by the model's own tokenizer when it has one (an encoder's has no end-of-text: it pads with
    its pad token), else by `enc` (the policy's)."""
    from transformers import AutoModelForSequenceClassification
    model = load_pretrained(AutoModelForSequenceClassification, path, "reward model",  # a causal LM's score
                            ": not a sequence-classification model (a causal LM? that goes in --init)").to(device).eval()
    tokenizer = auto_tokenizer(path) if ships_tokenizer(path) else None
    if tokenizer is not None:                                            # the model finds each text's last token by
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # its pad id: the one its tokenizer pads with
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of reward model {path} has neither a pad token nor an end-of-text (eos) "
                             "token to pad a batch of texts with")
        model.config.pad_token_id = tokenizer.pad_token_id
    elif model.config.pad_token_id is None:                             # the policy's tokens, padded by this id
        model.config.pad_token_id = enc.eot_token
    pad_id = model.config.pad_token_id
    n_tokens, rows = len(tokenizer) if tokenizer is not None else enc.n_vocab, getattr(model.config, "vocab_size", None)
    if rows is not None and rows < n_tokens:                              # a token id past the embedding: IndexError
        raise ValueError(f"reward model {path} has {rows} token embeddings, but the tokenizer it reads with "
                         f"({'its own' if tokenizer is not None else enc.name}) has {n_tokens} tokens")

    @torch.no_grad()
    def score(prompts, completions, chunk=512):                          # chunks: the exact evaluator scores 91,507
        texts = [p + c for p, c in zip(prompts, completions)]            # texts at once
        return [s for i in range(0, len(texts), chunk) for s in score_texts(texts[i:i + chunk])]

    def score_texts(texts):
        if tokenizer is not None:
            batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        else:
            ids = [enc.encode_ordinary(t)[-model.config.max_position_embeddings:] or [pad_id] for t in texts]
            batch = dict(zip(("input_ids", "attention_mask"), right_pad(ids, pad_id, device)))
        return model(**batch).logits[:, -1].float().tolist()
    return score
