#!/usr/bin/env bash
# The agent-scaling experiment on one GPU, Llama-2-7B shape (synthetic fp16 weights), in parts
# to be combined within the device tool's 10-minute command limit:
#   djinn:      decode modes full_djinn, partially_aware (30 runs after 5 warm-ups) and djinn_agents
#               N = $COUNTS (default 1 2 4 8 16 32), then doubled up to $SWEEP_CAP (default 1024)
#   decode:     the native decode reference (30 runs after 5 warm-ups) and semantic_blind (5 runs
#               after 1 warm-up: each run ships the whole KV cache both ways per token, ~18 s a run)
#   keepalive:  ray_keepalive at every N from 1 until its first out-of-memory (--stop-on-oom)
#   serverless: ray_serverless N = $COUNTS
#   native:     native_pytorch agents N = $COUNTS
#   bench:      djinn-bench bench-engine, every engine flag at its default, N = 1 256 512 1024
# The parts share one 570 s deadline: each command gets what is left of it, so the results are
# packed into OUTDIR/results.tgz (with the logs) even when a part runs long; result documents are
# written per N, so a part cut short keeps every N it finished.
# Usage (repo root, on the GPU machine): bash scripts/gpu/experiment.sh OUTDIR PART [PART...]
set -uo pipefail
out=$1; shift
res=${RESULTS:-/tmp/gpu-results} cap=${SWEEP_CAP:-1024}
read -ra counts <<< "${COUNTS:-1 2 4 8 16 32}"
deadline=$((SECONDS + 570))
mkdir -p "$res" "$out"
. scripts/gpu/setup.sh || exit 1
common=(--model-id meta-llama/Llama-2-7b-hf --weights synthetic --dtype float16 --new-tokens 50
        --sleep-seconds 10 --output-dir "$res/exp" --log-dir "$res")
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }
step() {  # step LOGNAME ARGS...: one djinn-bench command within the deadline, logged
  local log=$1; shift
  echo "+ djinn-bench $*" | tee -a "$res/$log"
  timeout --signal=INT --kill-after=20 "$(left)" python3 -m djinn.cli "$@" 2>&1 | tee -a "$res/$log"
}
for part in "$@"; do
  case "$part" in
    djinn)
      step run-djinn.log run "${common[@]}" --agent-counts "${counts[@]}" --djinn-sweep-cap "$cap" \
        --baselines full_djinn partially_aware djinn_agents --runs 30 --warmup-runs 5 --no-analyze ;;
    decode)
      step run-decode.log decode --backend native "${common[@]}" --runs 30 --warmup-runs 5
      step run-decode.log decode --backend djinn --mode semantic_blind "${common[@]}" --runs 5 --warmup-runs 1 ;;
    keepalive)
      step run-keepalive.log agents --baseline ray_keepalive "${common[@]}" --stop-on-oom \
        --agent-counts 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 ;;
    serverless)
      step run-serverless.log agents --baseline ray_serverless "${common[@]}" --agent-counts "${counts[@]}" ;;
    native)
      step run-native.log agents --baseline native_pytorch "${common[@]}" --agent-counts "${counts[@]}" ;;
    bench)
      step bench.log bench-engine --model-id meta-llama/Llama-2-7b-hf --weights synthetic \
        --agent-counts 1 256 512 1024 --json "$res/bench.json" ;;
    *) echo "unknown part $part (djinn, decode, keepalive, serverless, native, bench)" >&2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$res/device.txt"
tar -C "$res" -czf "$out/results.tgz" .
