#!/usr/bin/env bash
# End-to-end on real Kubernetes: brings up two kind clusters with
# deploy/multicluster/kind/up.sh in TOPOLOGY (multi-primary, the default;
# primary-remote; federated), then checks what a platform team would:
#   - the broker(s) registered the clusters that join them;
#   - multi-primary: each cluster exports echo and imported the other's
#     (ServiceImport with a ClusterSet IP, applied by its control plane);
#   - a client in each cluster, through its sidecar, reaches echo in both
#     clusters (the other one across the east-west gateways, mTLS end to
#     end), and echo sees the client's SPIFFE ID (federated: east's client
#     reaches west's echo in the other mesh by its clusterset name, with
#     its own trust domain's identity);
#   - a pod of a namespace labelled strait.io/inject=enabled in east gets
#     the sidecar from the injection webhook and reaches echo through it;
# and deletes the clusters (KEEP=1 keeps them).
#
# Usage: bash tests/kind/run.sh [TOPOLOGY]
# Needs docker, kind, kubectl and helm; without them it says so and exits
# 77 (skipped). This machine's CI has none of docker's images: the scripts
# are checked with shellcheck, the releases up.sh installs by
# tests/helm.rs (`up.sh TOPOLOGY --render DIR`, kubernetes-validate, and
# the chart installed into a real API server).
set -euo pipefail

topology=${1:-multi-primary}
case $topology in
    multi-primary | primary-remote | federated) ;;
    *) echo "tests/kind: $topology: not a topology (multi-primary, primary-remote, federated)" >&2; exit 64 ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
for tool in docker kind kubectl helm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "tests/kind: $tool is not installed: skipped" >&2
        exit 77
    fi
done
install=$root/deploy/multicluster/install.sh

if [ "${KEEP:-0}" != 1 ]; then
    trap '"$root/deploy/multicluster/kind/down.sh"' EXIT
fi
"$root/deploy/multicluster/kind/up.sh" "$topology"
td_east=cluster.local
[ "$topology" = federated ] && td_east=mesh-a.local

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# Polls CMD until it succeeds, for up to SECONDS.
until_ok() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    # Standard error shows: why a try failed is worth seeing.
    until "$@" >/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "$what (not within ${seconds}s)"
        sleep 2
    done
    echo "ok: $what"
}

# Whether the broker in BROKER lists each of CLUSTERS.
registered() {
    local broker=$1 list c
    shift
    list=$("$install" ctl "kind-$broker" cluster list)
    for c in "$@"; do
        grep -qw "$c" <<<"$list" || return 1
    done
}
case $topology in
    multi-primary) until_ok "the broker registered east and west" 60 registered east east west ;;
    primary-remote) until_ok "the broker registered east (west is served by east)" 60 registered east east ;;
    federated)
        until_ok "mesh a's broker registered east" 60 registered east east
        until_ok "mesh b's broker registered west" 60 registered west west
        ;;
esac

if [ "$topology" = multi-primary ]; then
    exported_twice() {
        [ "$("$install" ctl kind-east exports list | grep -c 'echo')" -ge 2 ]
    }
    until_ok "both clusters export demo/echo" 120 exported_twice

    imported() {
        local ip
        ip=$(kubectl --context "kind-$1" -n demo get serviceimports.multicluster.x-k8s.io echo \
            -o jsonpath='{.spec.ips[0]}')
        [ -n "$ip" ]
    }
    until_ok "east imported echo (ServiceImport with a ClusterSet IP)" 120 imported east
    until_ok "west imported echo (ServiceImport with a ClusterSet IP)" 120 imported west
fi

# 20 calls from CLUSTER's client to URL; prints the clusters that
# answered. Echo must see the client's identity in trust domain TD.
answered_by() {
    local cluster=$1 url=$2 td=$3 out
    for _ in $(seq 1 20); do
        out=$(kubectl --context "kind-$cluster" -n demo exec deploy/client -c app -- \
            curl -s --max-time 5 -x http://127.0.0.1:15001 "$url") || continue
        grep -q "\"peer_identity\":\"spiffe://$td/ns/demo/sa/client\"" <<<"$out" ||
            fail "echo did not see the client's identity in $td: $out"
        grep -o '"cluster":"[a-z]*"' <<<"$out"
    done | sort -u
}
reaches_both() {
    local seen
    seen=$(answered_by "$@")
    grep -q '"cluster":"east"' <<<"$seen" && grep -q '"cluster":"west"' <<<"$seen"
}
if [ "$topology" = federated ]; then
    until_ok "east's client (mesh a) reaches echo in west (mesh b) as spiffe://mesh-a.local/..." 180 \
        reaches_both east http://echo.demo.svc.clusterset.local:8080/ mesh-a.local
    until_ok "west's client (mesh b) reaches echo in east (mesh a) as spiffe://mesh-b.local/..." 180 \
        reaches_both west http://echo.demo.svc.clusterset.local:8080/ mesh-b.local
else
    until_ok "east's client reaches echo in east and in west" 180 \
        reaches_both east http://echo.demo:8080/ cluster.local
    until_ok "west's client reaches echo in west and in east" 180 \
        reaches_both west http://echo.demo:8080/ cluster.local
fi

# Injection: a pod of a labelled namespace gets the sidecar, gets ready
# (certificate and config from the control plane) and reaches echo.
kubectl --context kind-east create namespace injected --dry-run=client -o yaml |
    kubectl --context kind-east apply -f - >/dev/null
kubectl --context kind-east label namespace injected strait.io/inject=enabled --overwrite >/dev/null
kubectl --context kind-east -n injected delete pod probe --ignore-not-found >/dev/null
kubectl --context kind-east -n injected run probe --image="${STRAIT_IMAGE:-strait:dev}" \
    --image-pull-policy=IfNotPresent --port=8080 --restart=Never \
    --command -- strait lab echo --listen 127.0.0.1:8080 --cluster east >/dev/null
injected() {
    kubectl --context kind-east -n injected get pod probe \
        -o jsonpath='{.spec.containers[*].name}' | grep -qw strait-sidecar
}
until_ok "a pod of a labelled namespace got strait-sidecar" 60 injected
kubectl --context kind-east -n injected wait --for=condition=Ready pod/probe --timeout=120s >/dev/null ||
    fail "the injected pod never got ready"
probe_reaches_echo() {
    kubectl --context kind-east -n injected exec probe -c probe -- \
        curl -s --max-time 5 http://echo.demo:8080/ | grep -q "\"peer_identity\":\"spiffe://$td_east/ns/injected/sa/default\""
}
until_ok "the injected pod reaches echo through its sidecar (http_proxy)" 60 probe_reaches_echo

echo "tests/kind: all checks passed ($topology)"
