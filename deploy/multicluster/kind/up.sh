#!/usr/bin/env bash
# Brings up a strait federation on kind: two clusters, east and west, in
# one of three topologies, installed with the Helm chart deploy/helm/strait
# (the values of deploy/helm/examples/<topology>.yaml, with this machine's
# addresses), and the demo (echo, exported, and a client) in both.
#
#   multi-primary   one mesh; each cluster runs its control plane and
#                   gateway; the broker runs in east
#   primary-remote  one mesh; east's control plane also serves west, whose
#                   gateway and sidecars follow it through east's gateway
#   federated       two meshes (trust domains mesh-a.local, mesh-b.local),
#                   a broker in each cluster, peered; echo is exported to
#                   the other mesh
#
# Usage: deploy/multicluster/kind/up.sh [TOPOLOGY] [--render DIR]
#   --render DIR  make no cluster: write each helm release's values and
#                 rendered objects to DIR (placeholder addresses and
#                 tokens); tests/helm.rs validates what this renders
# Needs docker, kind, kubectl and helm (or `bash scripts/tools.sh helm`).
# Builds the image from this checkout (docker build), loads it into the
# clusters (no registry). Idempotent: run again to update.
# Tear down with deploy/multicluster/kind/down.sh.
set -euo pipefail

topology=multi-primary
render=""
while [ $# -gt 0 ]; do
    case $1 in
        multi-primary | primary-remote | federated) topology=$1; shift ;;
        --render) render=${2:?--render needs a directory}; shift 2 ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "up.sh: $1: not a topology (multi-primary, primary-remote, federated) or --render DIR" >&2; exit 64 ;;
    esac
done

root=$(cd "$(dirname "$0")/../../.." && pwd)
chart=$root/deploy/helm/strait
examples=$root/deploy/helm/examples
install=$root/deploy/multicluster/install.sh
image=${STRAIT_IMAGE:-strait:dev}
export STRAIT_IMAGE=$image
clusters=(east west)

helm=$(command -v helm || true)
if [ -z "$helm" ] && [ -x "$(bash "$root/scripts/tools.sh" --path)/helm" ]; then
    helm="$(bash "$root/scripts/tools.sh" --path)/helm"
fi
[ -n "$helm" ] || { echo "up.sh: helm is needed (or: bash scripts/tools.sh helm)" >&2; exit 1; }
if [ -z "$render" ]; then
    for tool in docker kind kubectl; do
        command -v "$tool" >/dev/null 2>&1 || { echo "up.sh: $tool is needed" >&2; exit 1; }
    done
fi

# One helm release per cluster, in strait-system. With --render: its
# values and `helm template` output, written to $render.
release() {
    local cluster=$1
    shift
    if [ -n "$render" ]; then
        mkdir -p "$render"
        printf '%s\n' "$@" >"$render/$topology-$cluster.args"
        # helm's INFO lines (the chart's CRDs are symbolic links) go to the log.
        "$helm" template strait "$chart" -n strait-system "$@" \
            >"$render/$topology-$cluster.yaml" 2>"$render/$topology-$cluster.log" ||
            { cat "$render/$topology-$cluster.log" >&2; exit 1; }
        return
    fi
    echo "==> helm release strait on kind-$cluster" >&2
    "$helm" --kube-context "kind-$cluster" upgrade --install strait "$chart" \
        -n strait-system --create-namespace --wait --timeout 5m "$@"
}

# straitctl on the broker of CLUSTER (a placeholder answer with --render).
ctl() {
    local cluster=$1
    shift
    if [ -n "$render" ]; then
        echo "render-placeholder-$1-$2"
        return
    fi
    "$install" ctl "kind-$cluster" "$@"
}

# Whether CLUSTER's broker must be installed before the rest of its
# release: on the first run (no join token yet), not with --render.
broker_first() {
    [ -z "$render" ] &&
        ! kubectl --context "kind-$1" -n strait-system get secret strait-join >/dev/null 2>&1
}

# The join token of CLUSTER (NAME at the broker of BROKER): the one its
# release holds already, or a new one from the broker.
join_token() {
    local cluster=$1 broker=$2 name=$3 network=$4 locality=$5
    local old=""
    if [ -z "$render" ]; then
        old=$(kubectl --context "kind-$cluster" -n strait-system get secret strait-join \
            -o jsonpath='{.data.token}' 2>/dev/null | base64 -d || true)
    fi
    if [ -n "$old" ]; then
        echo "$old"
    else
        ctl "$broker" cluster add "$name" --network "$network" --locality "$locality"
    fi
}

if [ -n "$render" ]; then
    east_ip=172.18.0.2
    west_ip=172.18.0.3
else
    for c in "${clusters[@]}"; do
        if ! kind get clusters 2>/dev/null | grep -qx "$c"; then
            echo "==> kind cluster $c" >&2
            kind create cluster --name "$c" --wait 120s
        fi
    done
    echo "==> image $image" >&2
    docker build -t "$image" -f "$root/deploy/multicluster/Dockerfile" "$root"
    for c in "${clusters[@]}"; do
        kind load docker-image "$image" --name "$c"
    done
    # Clusters reach each other's NodePorts at the node addresses on
    # kind's docker network.
    node_ip() {
        docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1-control-plane"
    }
    east_ip=$(node_ip east)
    west_ip=$(node_ip west)
fi

image_values=(--set "image.repository=${image%:*}" --set "image.tag=${image##*:}")
# A broker first (the join tokens come from it), then the cluster's parts.
broker_only=(--set components.controlPlane=false --set components.gateway=false
    --set components.webhook=false)

# The kubeconfig east's control plane reads west with: west's API at its
# address on kind's network, as account strait-remote-reader (made by
# west's release).
remote_kubeconfig() {
    if [ -n "$render" ]; then
        echo "render-placeholder-kubeconfig"
        return
    fi
    local token ca server
    token=$(kubectl --context kind-west -n strait-system get secret strait-remote-reader-token \
        -o jsonpath='{.data.token}' | base64 -d)
    ca=$(kubectl --context kind-west -n strait-system get secret strait-remote-reader-token \
        -o jsonpath='{.data.ca\.crt}')
    server=$(kind get kubeconfig --internal --name west | sed -n 's/^ *server: //p')
    cat <<EOF
apiVersion: v1
kind: Config
current-context: west
clusters: [{name: west, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: reader, user: {token: "$token"}}]
contexts: [{name: west, context: {cluster: west, user: reader}}]
EOF
}

case $topology in
    multi-primary)
        east=(-f "$examples/multi-primary.yaml" "${image_values[@]}"
            --set broker.trustDomain=cluster.local --set broker.advertise="$east_ip:31011"
            --set cluster.gateway="$east_ip:31443")
        ! broker_first east || release east "${east[@]}" "${broker_only[@]}"
        release east "${east[@]}" --set-string cluster.joinToken="$(join_token east east east net-east region-1/zone-a)"
        release west -f "$examples/multi-primary.yaml" "${image_values[@]}" \
            --set components.broker=false \
            --set cluster.name=west --set cluster.network=net-west \
            --set cluster.gateway="$west_ip:31443" \
            --set-string cluster.joinToken="$(join_token west east west net-west region-1/zone-b)"
        ;;
    primary-remote)
        # West first: the account east reads it with.
        release west -f "$examples/remote.yaml" "${image_values[@]}" \
            --set remote.controlPlane="$east_ip:31012" \
            --set "gateway.service.externalIPs={$west_ip}"
        if [ -z "$render" ]; then
            # How the primary finds west's network (Helm does not own the namespace).
            kubectl --context kind-west label namespace strait-system \
                topology.istio.io/network=net-west --overwrite >/dev/null
            kubectl --context kind-east create namespace strait-system --dry-run=client -o yaml |
                kubectl --context kind-east apply -f - >/dev/null
            remote_kubeconfig | kubectl --context kind-east -n strait-system create secret generic \
                strait-remote-west --from-file=kubeconfig=/dev/stdin --dry-run=client -o yaml |
                kubectl --context kind-east apply -f - >/dev/null
        fi
        east=(-f "$examples/primary-remote.yaml" "${image_values[@]}"
            --set broker.trustDomain=cluster.local --set broker.advertise="$east_ip:31011"
            --set cluster.gateway="$east_ip:31443")
        ! broker_first east || release east "${east[@]}" "${broker_only[@]}"
        release east "${east[@]}" --set-string cluster.joinToken="$(join_token east east east net-east region-1/zone-a)"
        ;;
    federated)
        for c in east west; do
            ip=$east_ip mesh=a
            [ "$c" = west ] && ip=$west_ip mesh=b
            values=(-f "$examples/federated.yaml" "${image_values[@]}"
                --set cluster.name="$c" --set cluster.network="net-$c"
                --set cluster.gateway="$ip:31443" --set broker.trustDomain="mesh-$mesh.local"
                --set broker.meshName="$mesh" --set broker.advertise="$ip:31011"
                --set broker.peerAdvertise="$ip:31013")
            ! broker_first "$c" || release "$c" "${values[@]}" "${broker_only[@]}"
            release "$c" "${values[@]}" \
                --set-string cluster.joinToken="$(join_token "$c" "$c" "$c" "net-$c" "region-$mesh/zone-1")"
        done
        if [ -z "$render" ] && ! ctl west peer list | grep -qw a; then
            echo "==> peering mesh b (west) with mesh a (east)" >&2
            ctl west peer establish "$(ctl east peer token)"
        fi
        ;;
esac
[ -z "$render" ] || { echo "rendered $topology into $render" >&2; exit 0; }

for c in "${clusters[@]}"; do
    "$install" demo "kind-$c"
done
if [ "$topology" = federated ]; then
    kubectl --context kind-east -n demo annotate service echo strait.io/export-to=mesh:b --overwrite >/dev/null
    kubectl --context kind-west -n demo annotate service echo strait.io/export-to=mesh:a --overwrite >/dev/null
fi

cat >&2 <<MSG

strait ($topology) is up on kind-east and kind-west. Try:
  $install ctl kind-east cluster list
  kubectl --context kind-west -n demo get serviceentries,serviceimports
  kubectl --context kind-east -n demo exec deploy/client -c app -- \\
      curl -s -x http://127.0.0.1:15001 http://echo.demo:8080/
  bash $root/tests/kind/run.sh $topology    # the checks
  $root/deploy/multicluster/kind/down.sh
MSG
