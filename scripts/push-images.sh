#!/usr/bin/env bash
# Build the four images and push them to a registry the cluster's nodes can pull from, then print
# the helm flags that point the chart at them.
#   scripts/push-images.sh 111122223333.dkr.ecr.us-east-1.amazonaws.com/djinn-bench   # ECR: repos + login
#   scripts/push-images.sh ghcr.io/my-org                                           # after docker login
# Variables: TAG (default: the version in pyproject.toml), PLATFORM (default linux/amd64: EKS GPU nodes).
# Needs docker with buildx; for ECR also the aws CLI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGISTRY="${1:-${REGISTRY:-}}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)}"
PLATFORM="${PLATFORM:-linux/amd64}"

die() { printf 'push-images: %s\n' "$*" >&2; exit 1; }
[[ -n "$REGISTRY" ]] || die "usage: scripts/push-images.sh <registry/prefix> (e.g. <account>.dkr.ecr.<region>.amazonaws.com/djinn-bench)"
[[ -n "$TAG" && "$TAG" != "latest" ]] || die "TAG must be a version, not '${TAG:-}' (pods would pull :latest on every start)"
command -v docker >/dev/null 2>&1 || die "docker is not on PATH"
REGISTRY="${REGISTRY%/}"

NAMES=(djinn-bench djinn-bench-server djinn-bench-runner djinn-operator)
dockerfile_of() {  # (no associative arrays: macOS ships bash 3.2)
  case "$1" in
    djinn-bench) echo Dockerfile ;;
    djinn-bench-server) echo images/server.Dockerfile ;;
    djinn-bench-runner) echo images/runner.Dockerfile ;;
    djinn-operator) echo images/operator.Dockerfile ;;
  esac
}

if [[ "$REGISTRY" =~ ^([0-9]{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(/(.*))?$ ]]; then
  command -v aws >/dev/null 2>&1 || die "aws CLI is not on PATH (needed for ECR)"
  host="${REGISTRY%%/*}" region="${BASH_REMATCH[2]}" prefix="${BASH_REMATCH[4]:-}"
  for name in "${NAMES[@]}"; do
    repo="${prefix:+$prefix/}$name"
    aws ecr describe-repositories --region "$region" --repository-names "$repo" >/dev/null 2>&1 \
      || aws ecr create-repository --region "$region" --repository-name "$repo" >/dev/null
  done
  aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$host"
fi

for name in "${NAMES[@]}"; do
  printf '\n==> %s/%s:%s\n' "$REGISTRY" "$name" "$TAG"
  docker buildx build --platform "$PLATFORM" -f "$ROOT/$(dockerfile_of "$name")" -t "$REGISTRY/$name:$TAG" \
    --push "$ROOT"
done

cat <<MSG

Pushed. Point the chart at them:
  --set image.repository=$REGISTRY/djinn-bench --set-string image.tag=$TAG \\
  --set serverImage.repository=$REGISTRY/djinn-bench-server --set-string serverImage.tag=$TAG \\
  --set operator.image.repository=$REGISTRY/djinn-operator --set-string operator.image.tag=$TAG
A private registry outside ECR also needs: --set "imagePullSecrets[0].name=<docker-registry Secret>"
MSG
