#!/usr/bin/env bash
# The GPU checks behind docs/gpu.md, in one go, each step's log in $out:
#   1. the default run (the embedded task) on the GPU, bf16;
#   2. Pythia-160M and 1B shapes (random weights, tools/gpu_models.py), a 124M reward model, HH-style prompts,
#      at the default lr for --init; 3. the 1B shape at the tiny task's lr 3e-5: the KL guard stops it;
#   4. experiments/bench.py at the 124M shape; 5. torchrun over NCCL with one process; 6. the test suite;
#   7. where the real model can be had (tools/smollm2.sh: its folder, its GGUF file or its package), SmolLM2-135M's
#   real weights against the sentiment reward, full fine-tune and LoRA.
# Needs GPT-2's BPE (tiktoken's r50k_base): the network, or TIKTOKEN_CACHE_DIR.
# Run: bash tools/gpu_check.sh [out_dir]      APA_GPU_CHECK_TINY=1: tiny shapes and no suite, a dry run on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu_check}
tiny=${APA_GPU_CHECK_TINY:-0}
mkdir -p "$out"
if [ "$tiny" = 1 ]; then
  small=(--iters=2 --batch_size=8 --minibatch_size=4 --epochs=1); tokens=(8 8); default=(--iters=2 --sft_steps=5)
  bench=(--models=tiny --batch_size=4 --max_new_tokens=4 --rounds=1 --iters=1)
else
  small=(--iters=4 --batch_size=64 --minibatch_size=16); tokens=(128 64); default=(--iters=200)
  bench=(--device=cuda --models=gpt2-small --batch_size=64 --max_new_tokens=128 --epochs=4 --cuda_graph=1)
fi
step() {  # step NAME COMMAND...: run it, its output to $out/NAME.log, its time at the end
  echo "== $1: ${*:2}"
  local t0=$SECONDS
  "${@:2}" > "$out/$1.log" 2>&1 || { echo "   FAILED (exit $?), see $out/$1.log"; tail -5 "$out/$1.log"; return 1; }
  grep -E '^(apa|ppo|awr) \|' "$out/$1.log" | head -1 | sed 's/^/   /' || true
  grep -E '^iter ' "$out/$1.log" | tail -1 | sed 's/^/   /' || true
  echo "   $((SECONDS - t0)) s"
}
hh=(--reward_model="$out/models/reward" --prompts="$out/models/hh.jsonl" --eval_prompts="$out/models/hh_eval.jsonl"
    --eval_every=2 --eval_samples=64 --jstar_samples=0 --sample_every=0 --cuda_graph=1)  # the graph: opt-in
python tools/gpu_models.py --out="$out/models" $([ "$tiny" = 1 ] && echo --tiny)
status=0
step default python train.py --out_dir="$out/default" --sft_dir="$out/sft" "${default[@]}" || status=1
step pythia-160m python train.py --init="$out/models/pythia-160m" --out_dir="$out/160m" "${hh[@]}" "${small[@]}" \
  --max_new_tokens="${tokens[0]}" || status=1
step pythia-1b python train.py --init="$out/models/pythia-1b" --out_dir="$out/1b" "${hh[@]}" "${small[@]}" \
  --max_new_tokens="${tokens[1]}" || status=1
step pythia-1b-lr3e-5 python train.py --init="$out/models/pythia-1b" --out_dir="$out/1b_lr3e-5" "${hh[@]}" "${small[@]}" \
  --max_new_tokens="${tokens[1]}" --lr=3e-5 || status=1
grep -c "target_kl: stopped" "$out/pythia-1b-lr3e-5.log" | sed 's/^/   updates stopped by the KL guard: /' || true
step bench python -m experiments.bench "${bench[@]}" || status=1
tail -3 "$out/bench.log"
step nccl python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --out_dir="$out/nccl" \
  --sft_dir="$out/sft" --iters=3 $([ "$tiny" = 1 ] && echo --sft_steps=5) || status=1
if real=$(bash tools/smollm2.sh); then                                 # the real model, where it can be had
  sentiment=(--init="$real" --reward_fn=lab.sentiment:vader_reward --prompts=prompts/reviews.txt
             --eval_prompts=prompts/reviews_eval.txt --eval_every=2 --eval_samples=64 --jstar_samples=0 --sample_every=2
             --lr=1e-5)
  step smollm2 python train.py "${sentiment[@]}" --out_dir="$out/smollm2_full" "${small[@]}" --max_new_tokens="${tokens[0]}" \
    || status=1
  step smollm2-lora python train.py "${sentiment[@]}" --out_dir="$out/smollm2_lora" "${small[@]}" \
    --max_new_tokens="${tokens[0]}" --lora_r=8 || status=1
else
  echo "== smollm2: skipped, no real model here (docs/gpu.md says how to bring it)"
fi
if [ "$tiny" != 1 ]; then
  echo "== suite: python -m pytest -q"
  python -m pytest -q 2>&1 | tee "$out/suite.log" | tail -3 || status=1
fi
exit $status
