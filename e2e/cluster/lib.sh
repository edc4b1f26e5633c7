# Shared settings of e2e/cluster/{up,down} and images/build-oci (sourced, not run).
# Everything the cluster writes lives under RUN_DIR, except the CNI network namespaces
# (/var/run/netns/cni-*, chosen by containerd) and the iptables chains of kube-proxy and CNI.
RUN_DIR=${PDFLEET_CLUSTER_DIR:-/tmp/pdfleet-cluster}
NODE_NAME=pdfleet-node
# The node, the API server and the pods all sit on one local bridge that up creates, so no
# traffic ever needs the host's real interface. Its subnet is the pod network.
BRIDGE=pdfleet0
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
API_URL=https://$NODE_IP:6443
# On the bridge address: the host and the pods (the operator's autoscaler) both reach it.
PROM_URL=http://$NODE_IP:9090
CTR_SOCK=$RUN_DIR/containerd/containerd.sock
KUBECONFIG_PATH=$RUN_DIR/kubeconfig
ctr_() { ctr --address "$CTR_SOCK" --namespace k8s.io "$@"; }

# Pinned tool versions, and the cache folders that e2e/cluster/build fills (one per pin, so a
# changed pin builds afresh and an unchanged one is never rebuilt).
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$_here/../.." && pwd)
OCI_DIR=${PDFLEET_OCI_DIR:-$REPO_ROOT/target/oci}
# The Kubernetes pin is the k8s.io/kubernetes require of the wrapper module k8s/go.mod.
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$_here/k8s/go.mod")
HELM_VERSION=v3.19.5      # the helm line made for Kubernetes 1.34
# Prometheus 3.7.3 (Go module version v0.307.3), pinned by the wrapper module prometheus/go.mod.
PROM_VERSION=$(awk '$1 == "github.com/prometheus/prometheus" {print $2; exit}' "$_here/prometheus/go.mod")
# etcd 3.5, pinned by the wrapper module etcd/go.mod.
ETCD_VERSION=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$_here/etcd/go.mod")
# CI may run with a bare environment: Go and the cache folder need a HOME.
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pdfleet
# NVRTC for the worker image's CUDA backend (the NVIDIA container toolkit brings the driver, not
# NVRTC): the nvidia-cuda-nvrtc wheel of the CUDA the workers' cudarc is built for.
NVRTC_VERSION=13.0.88
NVRTC_SHA256_AMD64=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
NVRTC_SHA256_ARM64=d27f20a0ca67a4bb34268a5e951033496c5b74870b868bacd046b1b8e0c3267b
NVRTC_DIR=$CACHE_DIR/nvrtc-$NVRTC_VERSION
K8S_BIN=$CACHE_DIR/k8s-$K8S_VERSION/bin
HELM_BIN=$CACHE_DIR/helm-$HELM_VERSION/bin
PROM_BIN=$CACHE_DIR/prometheus-$PROM_VERSION/bin
ETCD_BIN=$CACHE_DIR/etcd-$ETCD_VERSION/bin
ASSETS_DIR=$CACHE_DIR/kubebuilder-assets-$K8S_VERSION-etcd-$ETCD_VERSION
export PATH=$K8S_BIN:$HELM_BIN:$PROM_BIN:$ETCD_BIN:$PATH
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin # where the machine image puts Go
