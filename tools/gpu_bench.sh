#!/usr/bin/env bash
# The GPU measurements behind docs/gpu.md, in one go, each step's log in $out:
#   1. tests/test_gpu.py (the CUDA graph sampler's tests among them);
#   2. whether the CUDA graph draws the very tokens of the eager loop under one seed (fp32, printed);
#   3. experiments/bench.py at the 124M shape (batch 64, 128 new tokens, 4 epochs of minibatches of 32), with the profile;
#   4. experiments/bench.py at the Pythia-1B shape, the same batch, minibatches of 16, with the profile; then minibatches
#      of 32 and 64, the update alone;
#   5. where the real model can be had (tools/smollm2.sh), SmolLM2-135M's real weights in train.py at batch 64 and 128
#      new tokens, full fine-tune and LoRA: seconds per iteration and peak memory from its log lines.
# Run: bash tools/gpu_bench.sh [out_dir]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: its output to the screen and $out/NAME.log, its time at the end
  echo "== $1: ${*:2}"
  local t0=$SECONDS
  "${@:2}" 2>&1 | tee "$out/$1.log" || status=1
  echo "   $((SECONDS - t0)) s"
}
step tests python -m pytest -q -p no:cacheprovider tests/test_gpu.py
step same_tokens python - <<'PY'
import sys, tempfile, torch
sys.path.insert(0, "tests")
import model
from lab import static_sampler
from test_models import ARCHS, save_checkpoint
for arch in ARCHS:
    lm, tok = save_checkpoint(arch, tempfile.mkdtemp())
    lm, eot = lm.cuda(), tok.eos_token_id
    ids, mask = model.left_pad([tok.encode(t) for t in ["the plot", "the music was very"]] * 8, eot, torch.device("cuda"))
    static_sampler.DECODERS.clear()
    same = []
    for call in range(2):                                    # the capture's call, then one of replays alone
        torch.manual_seed(call)
        eager = model.generate(lm, ids, mask, 12, eot, len(tok))[0]
        torch.manual_seed(call)
        graph = static_sampler.generate_static(lm, ids, mask, 12, eot, len(tok))[0]
        same.append(f"{(eager == graph).float().mean().item():.3f}")
    print(f"{arch}: share of tokens equal to the eager loop's under one seed, capture call / replay call: {same}")
PY
bench=(python -m experiments.bench --device=cuda --batch_size=64 --max_new_tokens=128 --epochs=4 --cuda_graph=1)
step bench_124m "${bench[@]}" --models=gpt2-small --profile
step bench_1b "${bench[@]}" --models=pythia-1b --minibatch_size=16 --profile
step bench_1b_mb32 "${bench[@]}" --models=pythia-1b --minibatch_size=32 --rounds=0 --iters=2
step bench_1b_mb64 "${bench[@]}" --models=pythia-1b --minibatch_size=64 --rounds=0 --iters=2
if real=$(bash tools/smollm2.sh); then
  smol=(python train.py --init="$real" --reward_fn=lab.sentiment:vader_reward --prompts=prompts/reviews.txt
        --jstar_samples=0 --eval_every=0 --sample_every=0 --iters=5 --batch_size=64 --minibatch_size=32
        --max_new_tokens=128 --lr=1e-5 --cuda_graph=1)
  step smollm2_full "${smol[@]}" --out_dir="$out/smollm2_full"
  step smollm2_lora "${smol[@]}" --out_dir="$out/smollm2_lora" --lora_r=8
else
  echo "== smollm2: skipped, no real model here (docs/gpu.md says how to bring it)"
fi
exit $status
