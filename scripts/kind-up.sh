#!/usr/bin/env bash
# Run djinn-bench end to end on a local kind cluster (CPU only, no registry, no cloud):
#   1. create the kind cluster (unless it exists),
#   2. build the all-in-one and the operator images with non-latest tags and `kind load` them,
#   3. install KubeRay (its own Helm chart) and the djinn-bench chart with values-kind.yaml
#      (in-cluster MinIO as S3, sshleifer/tiny-gpt2 with synthetic weights, gpu false),
#   4. apply the example AgentScalingExperiment and wait until status.phase is Succeeded,
#   5. print how to fetch and plot the results.
#
# Needs docker, kind, kubectl and helm (v3.8+ or v4) on PATH. Re-running it is safe.
#   scripts/kind-up.sh                 # everything
#   SKIP_BUILD=1 scripts/kind-up.sh    # reuse images already built with the same tag
# Variables: CLUSTER, NAMESPACE, RELEASE, TAG, KUBERAY_VERSION, TIMEOUT_S (wait for Succeeded).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/djinn-bench"
CLUSTER="${CLUSTER:-djinn-bench}"
NAMESPACE="${NAMESPACE:-djinn}"
RELEASE="${RELEASE:-djinn-bench}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.4.2}"
TIMEOUT_S="${TIMEOUT_S:-3600}"
IMAGE="djinn-bench:$TAG"
OPERATOR_IMAGE="djinn-operator:$TAG"
# As in charts/djinn-bench/values-kind.yaml (tests/deploy checks that they agree).
EXAMPLE="agent-scaling-kind"
RESULTS_URI="s3://djinn-results/experiments"
CONTEXT="kind-$CLUSTER"

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'kind-up: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not on PATH ($2)"; }

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
[[ -n "$TAG" ]] || die "could not read the version from pyproject.toml; set TAG"
[[ "$TAG" != "latest" ]] || die "TAG=latest would make kind pull the images again (pull policy Always); use a version"

log "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "exists"
else
  kind create cluster --name "$CLUSTER" --wait 180s
fi
kubectl config use-context "$CONTEXT" >/dev/null

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  log "build $IMAGE and $OPERATOR_IMAGE"
  docker build -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
  docker build -t "$OPERATOR_IMAGE" -f "$ROOT/images/operator.Dockerfile" "$ROOT"
fi
# Docker's containerd image store (its default since Docker 29) makes `kind load docker-image` fail;
# an image archive loads either way.
load_image() {
  if ! kind load docker-image "$1" --name "$CLUSTER"; then
    echo "kind load docker-image failed for $1; loading it as an archive"
    local archive
    archive="$(mktemp "${TMPDIR:-/tmp}/kind-image.XXXXXX.tar")"
    docker save -o "$archive" "$1"
    kind load image-archive "$archive" --name "$CLUSTER"
    rm -f "$archive"
  fi
}
log "load the images into kind"
load_image "$IMAGE"
load_image "$OPERATOR_IMAGE"

log "KubeRay operator $KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --kube-context "$CONTEXT" --namespace kuberay-system --create-namespace --wait --timeout 5m

chart_args=(
  "$RELEASE" "$CHART" --kube-context "$CONTEXT" --namespace "$NAMESPACE" --create-namespace
  -f "$CHART/values-kind.yaml" --set-string "image.tag=$TAG" --set-string "operator.image.tag=$TAG"
)
log "djinn-bench chart (operator, CRD, MinIO + bucket)"
helm upgrade --install "${chart_args[@]}" --wait --timeout 10m

log "apply the example experiment $NAMESPACE/$EXAMPLE"
# A second upgrade, so that the MinIO bucket (post-install hook) exists before the experiment starts.
helm upgrade "${chart_args[@]}" --set example.enabled=true --wait --timeout 5m

log "wait up to ${TIMEOUT_S}s for status.phase == Succeeded"
deadline=$((SECONDS + TIMEOUT_S))
last=""
while :; do
  phase="$(kubectl --context "$CONTEXT" -n "$NAMESPACE" get agentscalingexperiment "$EXAMPLE" \
             -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  if [[ "$phase" != "$last" ]]; then
    printf '%s phase=%s\n' "$(date +%H:%M:%S)" "${phase:-<none>}"
    last="$phase"
  fi
  case "$phase" in
    Succeeded) break ;;
    Failed)
      kubectl --context "$CONTEXT" -n "$NAMESPACE" get agentscalingexperiment "$EXAMPLE" -o yaml >&2 || true
      die "experiment $NAMESPACE/$EXAMPLE failed (status above)" ;;
  esac
  if (( SECONDS >= deadline )); then
    kubectl --context "$CONTEXT" -n "$NAMESPACE" get agentscalingexperiment "$EXAMPLE" -o yaml >&2 || true
    kubectl --context "$CONTEXT" -n "$NAMESPACE" get pods -o wide >&2 || true
    die "experiment $NAMESPACE/$EXAMPLE not Succeeded after ${TIMEOUT_S}s (phase ${phase:-<none>})"
  fi
  sleep 10
done
kubectl --context "$CONTEXT" -n "$NAMESPACE" get agentscalingexperiment "$EXAMPLE"

minio="$RELEASE-minio"
cat <<MSG

Results: $RESULTS_URI/$NAMESPACE/$EXAMPLE/{results,analysis}/ in the in-cluster MinIO.
Fetch and plot them from this machine (pip install -e . first):

  kubectl --context $CONTEXT -n $NAMESPACE port-forward svc/$minio 9000:9000 &
  export AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 AWS_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=\$(kubectl --context $CONTEXT -n $NAMESPACE get secret $minio -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d)
  export AWS_SECRET_ACCESS_KEY=\$(kubectl --context $CONTEXT -n $NAMESPACE get secret $minio -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d)
  djinn-bench analyze --input $RESULTS_URI/$NAMESPACE/$EXAMPLE

Tear down: helm --kube-context $CONTEXT -n $NAMESPACE uninstall $RELEASE && kind delete cluster --name $CLUSTER
MSG
