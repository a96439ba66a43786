#!/usr/bin/env bash
# The agent-scaling experiment on one GPU, Llama-2-7B shape (synthetic fp16 weights), in two parts
# that each fit the device tool's 10-minute command limit:
#   part djinn:  the engine benchmark, the Experiment 2.1 decode modes, djinn_agents N=1..32, native N=1..8
#   part ray:    ray_keepalive N=1..8 (stop on OOM), ray_serverless N=1..4 (a whole GPU per cold task)
# Usage (repo root, on the GPU machine): bash scripts/gpu/experiment.sh djinn|ray OUTDIR
set -euo pipefail
part=$1 out=$2
. scripts/gpu/setup.sh
common=(--model-id meta-llama/Llama-2-7b-hf --weights synthetic --dtype float16 --new-tokens 50
        --sleep-seconds 10 --output-dir "$out/exp" --log-dir "$out")
case "$part" in
  djinn)
    python3 -m djinn.cli bench-engine --model-id meta-llama/Llama-2-7b-hf --weights synthetic --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    python3 -m djinn.cli run "${common[@]}" --baselines full_djinn partially_aware semantic_blind djinn_agents \
      --runs 5 --warmup-runs 1 --agent-counts 1 2 4 8 16 32 --no-analyze 2>&1 | tee "$out/run-djinn.log"
    python3 -m djinn.cli agents --baseline native_pytorch "${common[@]}" --agent-counts 1 2 4 8 2>&1 | tee "$out/run-native.log" ;;
  ray)
    python3 -m djinn.cli agents --baseline ray_keepalive "${common[@]}" --agent-counts 1 2 4 8 --stop-on-oom 2>&1 | tee "$out/run-keepalive.log"
    python3 -m djinn.cli agents --baseline ray_serverless "${common[@]}" --agent-counts 1 2 4 2>&1 | tee "$out/run-serverless.log" ;;
esac
tar -C "$out" -czf "$out/results-$part.tgz" exp
