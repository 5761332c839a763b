#!/usr/bin/env bash
# Installs strait onto Kubernetes clusters with kubectl: the CRDs strait
# reads and writes, a mesh's trust broker, member clusters (control plane
# and east-west gateway, joined to the broker with a one-time token) and
# the demo workloads. Each step is idempotent: run it again to apply
# changed manifests.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
manifests=$here/manifests
image=${STRAIT_IMAGE:-strait:dev}

# The CRD sources the model's schema tests use (model/tests/testdata/crds).
istio_crds=https://raw.githubusercontent.com/istio/api/b8f8791d9653b2edc77a071d48887e582cfe84bf/kubernetes/customresourcedefinitions.gen.yaml
mcs_crds=https://raw.githubusercontent.com/kubernetes-sigs/mcs-api/ded161af6ea9596cd9e878c61ed4f4e8d5cf8401/config/crd

usage() {
    cat <<'EOF'
Usage:
  install.sh crds    CONTEXT
  install.sh broker  CONTEXT [--trust-domain TD] [--advertise HOST:PORT]
  install.sh cluster CONTEXT --broker-context CONTEXT --name NAME --network NET
                     --gateway HOST:PORT [--locality REGION/ZONE]
  install.sh demo    CONTEXT
  install.sh ctl     BROKER-CONTEXT ARGS...

  crds     Istio's CRDs (ServiceEntry, WorkloadEntry, DestinationRule, ...)
           and the MCS API's (ServiceExport, ServiceImport). Istio itself
           is not needed.
  broker   The mesh's trust broker in strait-system. --advertise is where
           clusters reach it (default: its Service's cluster DNS name,
           enough when every member runs in this cluster).
  cluster  Registers NAME at the broker (straitctl cluster add), then
           installs the control plane (with the join token) and the
           east-west gateway. --gateway is where other clusters reach this
           cluster's gateway. The control plane publishes the mesh roots
           in every namespace (ConfigMap strait-ca-root-cert).
  demo     The echo service (exported) and a client, with sidecars, in
           namespace demo.
  ctl      Runs straitctl in the broker's pod, with its admin credentials.

Environment:
  STRAIT_IMAGE  the image to run (default strait:dev)

Example (two clusters, one mesh; deploy/multicluster/kind/up.sh does this):
  install.sh crds kind-east
  install.sh broker kind-east --advertise 172.18.0.2:31011
  install.sh cluster kind-east --broker-context kind-east --name east \
      --network net-east --gateway 172.18.0.2:31443
  install.sh demo kind-east
  install.sh ctl kind-east exports list
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

# kubectl apply of a manifest file with the image replaced.
apply_manifest() {
    local context=$1 file=$2
    sed "s|strait:dev|${image}|g" "$manifests/$file" |
        kubectl --context "$context" apply -f -
}

ensure_namespace() {
    kubectl --context "$1" create namespace "$2" --dry-run=client -o yaml |
        kubectl --context "$1" apply -f - >/dev/null
}

ctl() {
    local context=$1
    shift
    kubectl --context "$context" -n strait-system exec strait-broker-0 -c broker -- \
        straitctl --broker 127.0.0.1:15011 --creds /var/lib/strait-broker/admin "$@"
}

cmd_crds() {
    local context=$1
    echo "==> CRDs on $context" >&2
    # Server-side: Istio's CRDs are too large for the last-applied annotation.
    kubectl --context "$context" apply --server-side -f "$istio_crds" >/dev/null
    for kind in serviceexports serviceimports; do
        kubectl --context "$context" apply --server-side \
            -f "$mcs_crds/multicluster.x-k8s.io_${kind}.yaml" >/dev/null
    done
    kubectl --context "$context" wait --for condition=established --timeout=60s \
        crd/serviceentries.networking.istio.io crd/workloadentries.networking.istio.io \
        crd/serviceexports.multicluster.x-k8s.io crd/serviceimports.multicluster.x-k8s.io >/dev/null
}

cmd_broker() {
    local context=$1
    shift
    local td=cluster.local advertise=strait-broker.strait-system.svc:15011
    while [ $# -gt 0 ]; do
        case $1 in
            --trust-domain) td=${2:?--trust-domain needs a value}; shift 2 ;;
            --advertise) advertise=${2:?--advertise needs a value}; shift 2 ;;
            *) die "broker: unknown argument $1" ;;
        esac
    done
    echo "==> broker of $td on $context (advertised as $advertise)" >&2
    ensure_namespace "$context" strait-system
    # Before the pod's first start: the root is made for this trust domain.
    kubectl --context "$context" -n strait-system create configmap strait-broker \
        --from-literal=trust-domain="$td" --from-literal=advertise="$advertise" \
        --dry-run=client -o yaml | kubectl --context "$context" apply -f - >/dev/null
    apply_manifest "$context" broker.yaml >/dev/null
    kubectl --context "$context" -n strait-system rollout status statefulset/strait-broker --timeout=180s
}

cmd_cluster() {
    local context=$1
    shift
    local broker="" name="" network="" gateway="" locality=""
    while [ $# -gt 0 ]; do
        case $1 in
            --broker-context) broker=${2:?}; shift 2 ;;
            --name) name=${2:?}; shift 2 ;;
            --network) network=${2:?}; shift 2 ;;
            --gateway) gateway=${2:?}; shift 2 ;;
            --locality) locality=${2:?}; shift 2 ;;
            *) die "cluster: unknown argument $1" ;;
        esac
    done
    if [ -z "$broker" ] || [ -z "$name" ] || [ -z "$network" ] || [ -z "$gateway" ]; then
        die "cluster: --broker-context, --name, --network and --gateway are needed"
    fi
    echo "==> cluster $name ($network) on $context" >&2
    ensure_namespace "$context" strait-system
    if ! kubectl --context "$context" -n strait-system get secret strait-join >/dev/null 2>&1; then
        local add=(cluster add "$name" --network "$network")
        [ -n "$locality" ] && add+=(--locality "$locality")
        local token
        token=$(ctl "$broker" "${add[@]}") || die "cluster: straitctl ${add[*]} failed"
        kubectl --context "$context" -n strait-system create secret generic strait-join \
            --from-literal=token="$token" >/dev/null
    fi
    kubectl --context "$context" -n strait-system create configmap strait-mesh \
        --from-literal=cluster="$name" --from-literal=network="$network" \
        --from-literal=gateway="$gateway" \
        --dry-run=client -o yaml | kubectl --context "$context" apply -f - >/dev/null
    apply_manifest "$context" cluster.yaml >/dev/null
    kubectl --context "$context" -n strait-system rollout status statefulset/strait-controlplane --timeout=180s
    kubectl --context "$context" -n strait-system rollout status deployment/eastwest-gateway --timeout=180s
}

cmd_demo() {
    local context=$1
    echo "==> demo on $context" >&2
    ensure_namespace "$context" demo
    local cluster
    cluster=$(kubectl --context "$context" -n strait-system get configmap strait-mesh \
        -o jsonpath='{.data.cluster}') || die "demo: install the cluster first"
    kubectl --context "$context" -n demo create configmap strait-mesh \
        --from-literal=cluster="$cluster" \
        --dry-run=client -o yaml | kubectl --context "$context" apply -f - >/dev/null
    apply_manifest "$context" demo.yaml >/dev/null
    kubectl --context "$context" -n demo rollout status deployment/echo --timeout=180s
    kubectl --context "$context" -n demo rollout status deployment/client --timeout=180s
}

command -v kubectl >/dev/null 2>&1 || die "kubectl is needed"
[ $# -ge 1 ] || { usage >&2; exit 64; }
case $1 in
    -h|--help|help) usage ;;
    crds) [ $# -eq 2 ] || die "crds CONTEXT"; cmd_crds "$2" ;;
    broker) [ $# -ge 2 ] || die "broker CONTEXT"; shift; cmd_broker "$@" ;;
    cluster) [ $# -ge 2 ] || die "cluster CONTEXT ..."; shift; cmd_cluster "$@" ;;
    demo) [ $# -eq 2 ] || die "demo CONTEXT"; cmd_demo "$2" ;;
    ctl) [ $# -ge 2 ] || die "ctl CONTEXT ARGS..."; shift; ctl "$@" ;;
    *) usage >&2; exit 64 ;;
esac
