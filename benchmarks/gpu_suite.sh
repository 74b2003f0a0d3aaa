#!/usr/bin/env bash
# The GPU numbers of docs/performance.md in one go (a few minutes on an H100/H200):
#   1. train, T5.1.1-base, batch 64, 512/128 tokens, bf16: t5tpu vs transformers eager and
#      torch.compile (AdamW on both sides), tokens/s and MFU; two more t5tpu rows, the
#      candidates for the MFU target: cuDNN's fused attention (attention_kernel=cudnn) and
#      bfloat16 attention logits (float32_attention_logits=False); and packed closed-book QA
#      against the same examples padded per batch (real tokens/s; needs seqio); then a trace
#      of t5tpu's step and a table of where its time goes (matmuls, fusions, copies, the
#      costliest operations), with the trace under $OUT/profile_base for TensorBoard
#   2. the same for T5.1.1-large at batch 32
#   3. greedy and beam-4 decoding of T5.1.1-base, batch 64, 512 inputs, 128 new tokens, and
#      where each one's time goes (trace under $OUT/profile_decode)
#   4. the largest batch of T5.1.1-xl (3B) full fine-tuning that fits, AdamW
# Each step prints its table and writes JSON under $OUT (default benchmarks/results/). A step
# that fails is reported and the next one still runs; the exit status says whether all ran.
#
#   pip install -e ".[gpu]" && bash benchmarks/gpu_suite.sh
#   TINY=1 bash benchmarks/gpu_suite.sh     # the same steps with tiny shapes, e.g. on a CPU
#   STEPS="decode xl" bash benchmarks/gpu_suite.sh   # only these steps (of base large decode xl),
#                                                    # e.g. to split a run over short sessions
set -uo pipefail
all_steps="base large decode xl"
only="${STEPS:-$all_steps}"
for key in $only; do
  case " $all_steps " in *" $key "*) ;; *)
    echo "gpu_suite.sh: STEPS has '$key'; choose among: $all_steps" >&2; exit 2;; esac
done
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python}"
# t5tpu and transformers share one process and one GPU: JAX takes memory as it needs it
# instead of 75% of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1

if [ "${TINY:-0}" = 1 ]; then
  large="--model t5_1_1/tiny --vocab 128 --batch 4 --inputs 16 --targets 8 --steps 1 --warmup 1"
  # The packed rows' task has 512 pieces, and its questions (~15 tokens) need rows of 64 to pack.
  base="--model t5_1_1/tiny --vocab 512 --batch 4 --inputs 64 --targets 16 --steps 1 --warmup 1"
  xl="--model t5_1_1/tiny --vocab 128 --inputs 16 --targets 8 --start 8 --memory_gib 1 --limit 64"
  decode="--model t5_1_1/tiny --vocab 128 --batch 4 --inputs 16 --new_tokens 4 --repeats 1 --warmup 1"
  compile=""  # torch.compile on a CPU takes minutes: left to the real run
  fused="attention_kernel=jax"  # the call cuDNN's row makes, in its XLA implementation
else
  base="--model t5_1_1/base --batch 64 --inputs 512 --targets 128 --dtype bfloat16 --steps 10 --warmup 3"
  large="--model t5_1_1/large --batch 32 --inputs 512 --targets 128 --dtype bfloat16 --steps 10 --warmup 3"
  xl="--model t5_1_1/xl --inputs 512 --targets 128 --start 16"
  decode="--model t5_1_1/base --batch 64 --inputs 512 --new_tokens 128 --dtype bfloat16"
  compile="--torch_compile"
  fused="attention_kernel=cudnn"
fi
packed="--packed"
if ! "$py" -c "import seqio" 2>/dev/null; then
  packed=""
  echo "(seqio is not installed here: the packed rows of step 1 are left out)"
fi

failed=()
step() {  # step KEY NAME COMMAND...: runs one benchmark (if STEPS has KEY), remembers a
          # failure, goes on
  local key="$1" name="$2"; shift 2
  case " $only " in *" $key "*) ;; *) echo "== $name: left out (STEPS=\"$only\")"; return;; esac
  echo "== $name"
  local t0=$SECONDS
  if ! "$@"; then
    failed+=("$name")
    echo "!! $name failed"
  fi
  echo "   ($name: $((SECONDS - t0)) s)"
}

step base "1. train: base" $py benchmarks/train_throughput.py $base --optimizer adamw $compile $packed \
  --variant "$fused" --variant float32_attention_logits=False \
  --profile "$out/profile_base" --json "$out/train_base.json"
step large "2. train: large" $py benchmarks/train_throughput.py $large --optimizer adamw $compile \
  --json "$out/train_large.json"
step decode "3. decode: greedy and beam 4" $py benchmarks/decode_throughput.py $decode --beams 1,4 \
  --profile "$out/profile_decode" --json "$out/decode_base.json"
# Alone in its process, JAX may take 90% of the card (its default limit is 75%).
step xl "4. largest xl batch (AdamW)" env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" $py benchmarks/max_batch.py $xl --optimizer adamw \
  --json "$out/max_batch_xl.json"
echo "results in $out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
