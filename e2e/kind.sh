#!/usr/bin/env bash
# The e2e on a kind cluster, for users with Docker and kind (the CI machine has neither a
# Docker engine nor a registry, and runs e2e/run on a local cluster instead): builds the
# images from images/Dockerfile.*, loads them into the kind nodes, runs e2e/test.
# KIND_CLUSTER (default pdfleet) is created unless it exists, and left running.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=${KIND_CLUSTER:-pdfleet}
export PDFLEET_IMAGE_TAG=${PDFLEET_IMAGE_TAG:-dev}
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster"
KUBECONFIG=$(mktemp)
export KUBECONFIG
trap 'rm -f "$KUBECONFIG"' EXIT
kind get kubeconfig --name "$cluster" >"$KUBECONFIG"
for n in toolbox worker operator router; do
  # Only the images whose crate exists yet (toolbox is plain busybox).
  [ $n = toolbox ] || grep -q "^name = \"pdfleet-$n\"" Cargo.lock || continue
  docker build -f "images/Dockerfile.$n" -t "pdfleet/$n:$PDFLEET_IMAGE_TAG" .
  kind load docker-image --name "$cluster" "pdfleet/$n:$PDFLEET_IMAGE_TAG"
done
# No Prometheus on the host here: the scrape test reports itself skipped.
e2e/test
