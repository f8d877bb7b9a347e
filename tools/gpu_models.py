"""
Random-weight checkpoints of the paper's shapes, built locally (nothing to download), for tools/gpu_check.sh:
Pythia-160M and Pythia-1B shapes (GPT-NeoX 12 x 768 and 16 x 2048, the embedding padded to 50,304 rows, saved in
bf16 as the hub's are), a GPT-2-small-shaped reward model (124M, one logit), and HH-style prompts (train and
held-out JSONL). The tokenizer is GPT-2's BPE (`--tokenizer=gpt2`, tiktoken's r50k_base, end-of-text 50256).
Random weights are near uniform: they measure time and memory, not what training does to an SFT model.
Run: python tools/gpu_models.py --out=out/gpu_check/models [--tiny]   (--tiny: 2 x 64 shapes, for a dry run)
"""
import argparse
import json
import os
import random

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

EOT, ROWS = 50256, 50304
SHAPES = {"pythia-160m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
          "pythia-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=8, intermediate_size=8192)}
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
TOPICS = ["a birthday party", "learning to cook rice", "a job interview", "fixing a bike tyre", "saving money",
          "a sore throat", "planting tomatoes", "writing a cover letter", "a noisy neighbour", "training a puppy",
          "a first marathon", "moving to a new city", "a broken laptop screen", "learning the guitar", "a long flight",
          "a wedding speech"]
ASKS = ["Can you help me with {}?", "What should I know about {}?", "I am worried about {}. Any advice?",
        "How do I get started with {}?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/gpu_check/models")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a dry run of gpu_check.sh on a CPU")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    for name, shape in SHAPES.items():
        path = os.path.join(args.out, name)
        if not os.path.exists(os.path.join(path, "config.json")):
            config = GPTNeoXConfig(vocab_size=ROWS, max_position_embeddings=2048, rotary_pct=0.25, bos_token_id=EOT,
                                   eos_token_id=EOT, **(TINY if args.tiny else shape))
            GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        print(f"{path}: GPT-NeoX {json.load(open(os.path.join(path, 'config.json')))['num_hidden_layers']} layers")
    path = os.path.join(args.out, "reward")
    if not os.path.exists(os.path.join(path, "config.json")):
        small = dict(n_layer=2, n_embd=64, n_head=4) if args.tiny else {}
        GPT2ForSequenceClassification(GPT2Config(num_labels=1, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
                                                 **small)).save_pretrained(path)
    rng = random.Random(0)
    dialogues = [f"\n\nHuman: {ask.format(topic)}\n\nAssistant:" for topic in TOPICS for ask in ASKS]
    rng.shuffle(dialogues)
    for file, part in (("hh.jsonl", dialogues[:48]), ("hh_eval.jsonl", dialogues[48:])):
        with open(os.path.join(args.out, file), "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in part)
    print(f"{path}: reward model; {args.out}/hh.jsonl: 48 prompts, hh_eval.jsonl: 16 held out")


if __name__ == "__main__":
    main()
