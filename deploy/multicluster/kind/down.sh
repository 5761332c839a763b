#!/usr/bin/env bash
# Deletes the kind clusters deploy/multicluster/kind/up.sh made.
set -euo pipefail
command -v kind >/dev/null 2>&1 || { echo "down.sh: kind is needed" >&2; exit 1; }
for c in east west; do
    if kind get clusters 2>/dev/null | grep -qx "$c"; then
        kind delete cluster --name "$c"
    fi
done
