#!/usr/bin/env bash
# The GPU numbers of docs/performance.md in one go (a few minutes on an H100/H200):
#   1. train, T5.1.1-base, batch 64, 512/128 tokens, bf16: t5tpu vs transformers eager and
#      torch.compile (AdamW on both sides), tokens/s and MFU; and packed closed-book QA
#      against the same examples padded per batch (real tokens/s)
#   2. the same for T5.1.1-large at batch 32
#   3. the largest batch of T5.1.1-xl (3B) full fine-tuning that fits, AdamW
#   4. greedy and beam-4 decoding of T5.1.1-base, batch 64, 512 inputs, 128 new tokens
# Each step prints its table and writes JSON under $OUT (default benchmarks/results/).
#
#   pip install -e ".[gpu]" && bash benchmarks/gpu_suite.sh
#   TINY=1 bash benchmarks/gpu_suite.sh     # the same steps with tiny shapes, e.g. on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python}"

if [ "${TINY:-0}" = 1 ]; then
  large="--model t5_1_1/tiny --vocab 128 --batch 4 --inputs 16 --targets 8 --steps 1 --warmup 1"
  # The packed rows' task has 512 pieces, and its questions (~15 tokens) need rows of 64 to pack.
  base="--model t5_1_1/tiny --vocab 512 --batch 4 --inputs 64 --targets 16 --steps 1 --warmup 1"
  xl="--model t5_1_1/tiny --vocab 128 --inputs 16 --targets 8 --start 8 --memory_gib 1 --limit 64"
  decode="--model t5_1_1/tiny --vocab 128 --batch 4 --inputs 16 --new_tokens 4 --repeats 1 --warmup 1"
  compile=""  # torch.compile on a CPU takes minutes: left to the real run
else
  base="--model t5_1_1/base --batch 64 --inputs 512 --targets 128 --dtype bfloat16 --steps 10 --warmup 3"
  large="--model t5_1_1/large --batch 32 --inputs 512 --targets 128 --dtype bfloat16 --steps 10 --warmup 3"
  xl="--model t5_1_1/xl --inputs 512 --targets 128 --start 16"
  decode="--model t5_1_1/base --batch 64 --inputs 512 --new_tokens 128 --dtype bfloat16"
  compile="--torch_compile"
fi

echo "== 1. train: base"
$py benchmarks/train_throughput.py $base --optimizer adamw $compile --packed --json "$out/train_base.json"
echo "== 2. train: large"
$py benchmarks/train_throughput.py $large --optimizer adamw $compile --json "$out/train_large.json"
echo "== 3. largest xl batch (AdamW)"
$py benchmarks/max_batch.py $xl --optimizer adamw --json "$out/max_batch_xl.json"
echo "== 4. decode: greedy and beam 4"
$py benchmarks/decode_throughput.py $decode --beams 1,4 --json "$out/decode_base.json"
echo "results in $out"
