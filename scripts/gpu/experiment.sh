#!/usr/bin/env bash
# The agent-scaling experiment on one GPU, Llama-2-7B shape (synthetic fp16 weights), in parts
# that each fit the device tool's 10-minute command limit:
#   bench:  djinn-bench bench-engine (engine vs HBM floor and HF generate; N = 1 8 32 128 256)
#   djinn:  Experiment 2.1 decode modes (5 runs) and djinn_agents N=1..32, native_pytorch N=1..8
#   ray:    ray_keepalive N=1..8 (stop on OOM), ray_serverless N=1..4 (a whole GPU per cold task)
# Results accumulate in $RESULTS (default /tmp/gpu-results, kept between calls on a warm machine)
# and are packed into OUTDIR/results.tgz after each part.
# Usage (repo root, on the GPU machine): bash scripts/gpu/experiment.sh PART OUTDIR
set -uo pipefail
part=$1 out=$2 res=${RESULTS:-/tmp/gpu-results}
mkdir -p "$res" "$out"
. scripts/gpu/setup.sh || exit 1
common=(--model-id meta-llama/Llama-2-7b-hf --weights synthetic --dtype float16 --new-tokens 50
        --sleep-seconds 10 --output-dir "$res/exp" --log-dir "$res")
case "$part" in
  bench)
    python3 -m djinn.cli bench-engine --model-id meta-llama/Llama-2-7b-hf --weights synthetic --json "$res/bench.json" 2>&1 | tee "$res/bench.log"
    # parking: --max-vram-gb 36 leaves ~22 GB of KV (2,610 blocks of 16 tokens); 256 agents need 3,072 at Reflect
    python3 -m djinn.cli bench-engine --model-id meta-llama/Llama-2-7b-hf --weights synthetic --max-vram-gb 36 \
      --agent-counts 256 --json "$res/bench-parking.json" 2>&1 | tee "$res/bench-parking.log" ;;
  djinn)
    python3 -m djinn.cli run "${common[@]}" --baselines full_djinn partially_aware semantic_blind djinn_agents \
      --runs 5 --warmup-runs 1 --agent-counts 1 2 4 8 16 32 --no-analyze 2>&1 | tee "$res/run-djinn.log"
    python3 -m djinn.cli agents --baseline native_pytorch "${common[@]}" --agent-counts 1 2 4 8 2>&1 | tee "$res/run-native.log" ;;
  ray)
    python3 -m djinn.cli agents --baseline ray_keepalive "${common[@]}" --agent-counts 1 2 4 8 --stop-on-oom 2>&1 | tee "$res/run-keepalive.log"
    python3 -m djinn.cli agents --baseline ray_serverless "${common[@]}" --agent-counts 1 2 4 2>&1 | tee "$res/run-serverless.log" ;;
esac
tar -C "$res" -czf "$out/results.tgz" .
