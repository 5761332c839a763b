#!/usr/bin/env bash
# strait quickstart: one mesh root, an intermediate for each of two
# clusters (east, west), a workload certificate in each cluster, and every
# chain verified by strait and, where installed, by openssl; the refusals
# that keep a mesh honest; then a trust broker that both clusters join,
# east exporting a service and west importing it as Istio objects.
#
# Usage: bash scripts/quickstart.sh [DIR]      (default DIR: .strait-quickstart)
# Re-running replaces DIR: it holds only this demo's throw-away keys.
set -euo pipefail

cd "$(dirname "$0")/.."
dir=${1:-.strait-quickstart}
td=example.org

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
# Commands are echoed to stderr, so that stdout stays the command's own.
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "Building strait"
cargo build --quiet --workspace --bins
strait=$PWD/target/debug/strait

rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"

step "A root CA for trust domain $td (its key stays here, mode 0600)"
run "$strait" ca init-root --trust-domain "$td" --out root --validity 10y

step "One intermediate per cluster, in Istio's plug-in CA layout (usable as istiod's cacerts)"
run "$strait" ca issue-intermediate --root root --cluster east --out east/cacerts --validity 1y
run "$strait" ca issue-intermediate --root root --cluster west --out west/cacerts --validity 1y

step "A workload certificate (X.509-SVID) in each cluster"
run "$strait" ca issue-workload --ca east/cacerts \
    --spiffe-id "spiffe://$td/ns/shop/sa/cart" --dns cart.shop.svc.cluster.local --out east/cart
run "$strait" ca issue-workload --ca west/cacerts \
    --spiffe-id "spiffe://$td/ns/shop/sa/payments" --ttl 12h --out west/payments

step "Each cluster trusts the other's workloads through the shared root"
run "$strait" ca verify --bundle east/cacerts/root-cert.pem --chain west/payments/cert-chain.pem \
    --expect-id "spiffe://$td/ns/shop/sa/payments"
run "$strait" ca verify --bundle west/cacerts/root-cert.pem --chain east/cart/cert-chain.pem \
    --expect-id "spiffe://$td/ns/shop/sa/cart"

if command -v openssl >/dev/null 2>&1; then
    step "openssl agrees (TLS client and server purposes)"
    run openssl verify -purpose sslclient -CAfile root/root-cert.pem \
        -untrusted east/cacerts/ca-cert.pem east/cart/cert-chain.pem
    run openssl verify -purpose sslserver -CAfile root/root-cert.pem \
        -untrusted west/cacerts/ca-cert.pem west/payments/cert-chain.pem
else
    step "openssl is not installed: skipping the openssl cross-check"
fi

step "What is in a workload certificate"
run "$strait" ca inspect east/cart/cert-chain.pem

step "The bundle in SPIFFE format, for federation with another mesh"
run "$strait" ca bundle export --bundle root/root-cert.pem --trust-domain "$td" --sequence 1 \
    > root/bundle.json
echo "(written to $dir/root/bundle.json)"

step "Refusals: each of these must fail"
expect_fail() {
    printf '$ %s\n' "$*"
    if "$@"; then
        echo "quickstart: expected a refusal, but the command succeeded" >&2
        exit 1
    fi
}
# The east intermediate signs only identities of its own trust domain.
expect_fail "$strait" ca issue-workload --ca east/cacerts \
    --spiffe-id spiffe://other.example/ns/shop/sa/cart --out east/evil
# A chain is not the identity it was not issued for.
expect_fail "$strait" ca verify --bundle root/root-cert.pem --chain east/cart/cert-chain.pem \
    --expect-id "spiffe://$td/ns/shop/sa/payments"
# A trust bundle of another mesh does not accept this mesh's workloads.
"$strait" ca init-root --trust-domain other.example --out other-root >/dev/null
expect_fail "$strait" ca verify --bundle other-root/root-cert.pem --chain east/cart/cert-chain.pem
# Keys are never overwritten silently.
expect_fail "$strait" ca init-root --trust-domain "$td" --out root
# SPIFFE IDs follow the specification.
expect_fail "$strait" ca check-id "spiffe://$td/ns/shop/sa/"

step "A trust broker signing with the same root, and two clusters that join it"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
api=127.0.0.1:$(free_port)
health=127.0.0.1:$(free_port)
"$strait" broker --data-dir broker --root root --listen "$api" --trust-domain "$td" \
    --health-listen "$health" > broker.log 2>&1 &
broker_pid=$!
trap 'kill "$broker_pid" 2>/dev/null; wait "$broker_pid" 2>/dev/null' EXIT
for _ in $(seq 1 200); do
    curl -sf "http://$health/healthz/ready" >/dev/null 2>&1 && break
    kill -0 "$broker_pid" 2>/dev/null || { cat broker.log; exit 1; }
    sleep 0.05
done
straitctl() { "$strait"ctl --broker "$api" --creds broker/admin "$@"; }
run straitctl cluster add east --network net-east --locality us-east/a > east.token
run straitctl cluster add west --network net-west --locality us-west/a > west.token
run "$strait" cluster join --token east.token --dir east/broker
run "$strait" cluster join --token west.token --dir west/broker

step "East exports reviews (a Service annotated strait.io/export and two workloads)"
cat > east/config.yaml <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  annotations:
    strait.io/export: "true"
spec:
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: bookinfo}
spec: {address: 10.1.0.11, labels: {app: reviews}, serviceAccount: bookinfo-reviews, locality: us-east/a}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-2, namespace: bookinfo}
spec: {address: 10.1.0.12, labels: {app: reviews}, serviceAccount: bookinfo-reviews, locality: us-east/a}
YAML
: > west/config.yaml
run "$strait" cluster sync --dir east/broker --config east/config.yaml --gateway 127.0.0.1:15443 --once
run "$strait" cluster sync --dir west/broker --config west/config.yaml --gateway 127.0.0.2:15443 --once \
    --imports-out west/imports.yaml
run straitctl cluster list
run straitctl exports list

step "What west imports: Istio and MCS objects pointing at east's gateway"
cat west/imports.yaml

step "Done: everything is in $dir/"
find . -name '*.pem' -o -name '*.json' -o -name '*.yaml' | sort
