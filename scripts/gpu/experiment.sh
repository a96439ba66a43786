#!/usr/bin/env bash
# The agent-scaling experiment on one GPU, Llama-2-7B shape (synthetic fp16 weights), in parts
# that each fit the device tool's 10-minute command limit:
#   djinn:      decode modes full_djinn, partially_aware (30 runs after 5 warm-ups) and djinn_agents
#               N = 1..32, then swept by doubling up to --djinn-sweep-cap (default 1024)
#   native:     native_pytorch agents N = 1..32 and its decode reference (30 runs after 5 warm-ups)
#   keepalive:  ray_keepalive at every N from 1 until its first out-of-memory (--stop-on-oom)
#   serverless: ray_serverless N = 1..32, then semantic_blind (5 runs after 1 warm-up: each run ships
#               the whole KV cache both ways per token, ~18 s a run)
#   bench:      djinn-bench bench-engine, every engine flag at its default, N = 1 256 512 1024
# Every command gets what is left of a 570 s deadline, so the results are packed into
# OUTDIR/results.tgz (with the logs) even when a part runs long; result documents are written per N.
# Usage (repo root, on the GPU machine): bash scripts/gpu/experiment.sh PART OUTDIR [SWEEP_CAP]
set -uo pipefail
part=$1 out=$2 cap=${3:-1024} res=${RESULTS:-/tmp/gpu-results}
deadline=$((SECONDS + 570))
mkdir -p "$res" "$out"
. scripts/gpu/setup.sh || exit 1
common=(--model-id meta-llama/Llama-2-7b-hf --weights synthetic --dtype float16 --new-tokens 50
        --sleep-seconds 10 --output-dir "$res/exp" --log-dir "$res")
counts=(--agent-counts 1 2 4 8 16 32)
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }
step() {  # step LOGNAME ARGS...: one djinn-bench command within the deadline, logged
  local log=$1; shift
  echo "+ djinn-bench $*" | tee -a "$res/$log"
  timeout --signal=INT --kill-after=20 "$(left)" python3 -m djinn.cli "$@" 2>&1 | tee -a "$res/$log"
}
case "$part" in
  djinn)
    step run-djinn.log run "${common[@]}" "${counts[@]}" --baselines full_djinn partially_aware djinn_agents \
      --djinn-sweep-cap "$cap" --no-analyze ;;
  native)
    step run-native.log agents --baseline native_pytorch "${common[@]}" "${counts[@]}"
    step run-native.log decode --backend native "${common[@]}" ;;
  keepalive)
    step run-keepalive.log agents --baseline ray_keepalive "${common[@]}" --stop-on-oom \
      --agent-counts 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 ;;
  serverless)
    step run-serverless.log agents --baseline ray_serverless "${common[@]}" "${counts[@]}"
    step run-blind.log decode --backend djinn --mode semantic_blind "${common[@]}" --runs 5 --warmup-runs 1 ;;
  bench)
    step bench.log bench-engine --model-id meta-llama/Llama-2-7b-hf --weights synthetic \
      --agent-counts 1 256 512 1024 --json "$res/bench.json" ;;
  *) echo "unknown part $part (djinn, native, keepalive, serverless, bench)" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$res/device.txt"
tar -C "$res" -czf "$out/results.tgz" .
