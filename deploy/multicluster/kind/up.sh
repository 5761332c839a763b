#!/usr/bin/env bash
# Brings up a strait federation on kind: two clusters, east and west, one
# mesh (multi-primary: each cluster runs its own control plane and
# east-west gateway; the broker runs in east), the demo in both.
#
# Usage: deploy/multicluster/kind/up.sh [multi-primary]
# Needs docker, kind and kubectl. Builds the image from this checkout
# (docker build), loads it into the clusters (no registry), and installs
# with deploy/multicluster/install.sh. Idempotent: run again to update.
# Tear down with deploy/multicluster/kind/down.sh.
set -euo pipefail

topology=${1:-multi-primary}
case $topology in
    multi-primary) ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "up.sh: topology $topology: only multi-primary is scripted for kind (strait lab runs all three)" >&2; exit 64 ;;
esac
for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "up.sh: $tool is needed" >&2; exit 1; }
done

root=$(cd "$(dirname "$0")/../../.." && pwd)
install=$root/deploy/multicluster/install.sh
image=${STRAIT_IMAGE:-strait:dev}
export STRAIT_IMAGE=$image
clusters=(east west)

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

# Clusters reach each other's NodePorts at the node addresses on kind's
# docker network.
node_ip() {
    docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1-control-plane"
}
east_ip=$(node_ip east)
west_ip=$(node_ip west)

for c in "${clusters[@]}"; do
    "$install" crds "kind-$c"
done
"$install" broker kind-east --advertise "$east_ip:31011"
"$install" cluster kind-east --broker-context kind-east --name east --network net-east \
    --gateway "$east_ip:31443" --locality region-1/zone-a
"$install" cluster kind-west --broker-context kind-east --name west --network net-west \
    --gateway "$west_ip:31443" --locality region-1/zone-b
for c in "${clusters[@]}"; do
    "$install" demo "kind-$c"
done

cat >&2 <<MSG

strait is up on kind-east and kind-west. Try:
  $install ctl kind-east cluster list
  $install ctl kind-east exports list
  kubectl --context kind-west -n demo get serviceentries,serviceimports
  kubectl --context kind-east -n demo exec deploy/client -c app -- \\
      curl -s -x http://127.0.0.1:15001 http://echo.demo:8080/
  $root/deploy/multicluster/kind/down.sh
MSG
