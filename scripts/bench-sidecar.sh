#!/usr/bin/env bash
# Benchmark (not a test): the latency one sidecar-to-sidecar mTLS hop adds.
# Brings up a lab (release build), pins east's client to east's echo (a
# DestinationRule with outlier detection makes locality-aware balancing
# prefer the caller's locality), then times N sequential keep-alive GETs
# (a) straight to the echo app and (b) through the client's sidecar and
# the echo's sidecar (HTTP/1.1 in, HTTP/2 over mTLS between sidecars).
# Prints p50/p99 of both, the added latency, and the sidecars' RSS.
#
# Usage: bash scripts/bench-sidecar.sh [N]      (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
base=140

echo "==> building strait (release)" >&2
cargo build --quiet --release --bins
strait=$PWD/target/release/strait
work=$(mktemp -d)
cleanup() { "$strait" lab down --dir "$work/lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

"$strait" lab up --dir "$work/lab" --ip-base "$base" >"$work/up.log" 2>&1 &
for _ in $(seq 1 600); do
    grep -q 'Running until' "$work/up.log" 2>/dev/null && break
    sleep 0.1
done
grep -q 'Running until' "$work/up.log" || { cat "$work/up.log" >&2; exit 1; }

cat >"$work/dr.yaml" <<'YAML'
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo.demo.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
YAML
"$strait" lab apply east "$work/dr.yaml" --dir "$work/lab" >/dev/null

python3 - "$work/lab/lab.json" "$n" <<'PY'
import http.client, json, statistics, sys, time

lab = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
east = lab["clusters"][0]
echo = next(w for w in east["workloads"] if w["service"] == "echo")
app_host = echo["inbound"].split(":")[0]
proxy_host, proxy_port = east["client_proxy"].removeprefix("http://").split(":")

def run(host, port, target):
    conn = http.client.HTTPConnection(host, int(port))
    lat = []
    for i in range(n + 100):
        t = time.perf_counter()
        conn.request("GET", target, headers={"Host": "echo.demo:8080"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            sys.exit(f"bench: {target} via {host}:{port} answered {r.status}: {body[:200]!r}")
        if i >= 100:  # warm-up left out
            lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]

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

d50, d99 = run(app_host, 8080, "/")
s50, s99 = run(proxy_host, proxy_port, "http://echo.demo:8080/")
print(f"requests: {n} sequential keep-alive GETs each")
print(f"direct to the app:          p50 {d50:.3f} ms  p99 {d99:.3f} ms")
print(f"through two sidecars (mTLS): p50 {s50:.3f} ms  p99 {s99:.3f} ms")
print(f"added by the sidecar hop:    p50 {s50 - d50:.3f} ms  p99 {s99 - d99:.3f} ms")
PY

for c in east/client/sidecar east/echo-v1/sidecar; do
    pid=$(python3 -c "import json,sys; print(json.load(open('$work/lab/run/procs.json'))['procs']['$c']['pid'])")
    echo "$c RSS after the run: $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status")"
done
pid=$(python3 -c "import json; print(json.load(open('$work/lab/run/procs.json'))['procs']['west/private/sidecar']['pid'])")
echo "an idle sidecar (west/private) RSS: $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status")"
