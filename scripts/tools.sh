#!/usr/bin/env bash
# Builds the real peers of strait's Kubernetes and etcd test tiers from their
# Go modules, each at one pinned release, once: later calls find the cached
# binary and return at once. Nothing is written inside the repository.
#
#   etcd            go.etcd.io/etcd/server/v3          (the HA broker store)
#   kube-apiserver  k8s.io/kubernetes/cmd/kube-apiserver (the real API server tier)
#   kubectl         k8s.io/kubernetes/cmd/kubectl       (within the apiserver's skew)
#   helm            helm.sh/helm/v4/cmd/helm            (chart lint, template, install)
#
# Usage:
#   bash scripts/tools.sh [etcd|kube|helm|all]...   # build what is missing (default: all)
#   bash scripts/tools.sh --path                    # print the bin directory to put on PATH
#
# Example:
#   export PATH="$(bash scripts/tools.sh --path):$PATH"; bash scripts/tools.sh etcd && etcd --version
#
# The cache is $STRAIT_TOOLS (default ~/.cache/strait/tools), one directory
# per tool and version, so a version bump here builds anew and leaves the
# old one alone. A build takes minutes on 2 cores (kube-apiserver the
# longest); each prints one line when it starts and one when it is done.
set -euo pipefail

ETCD_VERSION=v3.6.16
KUBE_VERSION=v1.35.4
HELM_VERSION=v4.3.2

cache=${STRAIT_TOOLS:-$HOME/.cache/strait/tools}
bin="$cache/bin"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 64
}

# Makes $1 a wrapper module requiring module $2 at $3 that imports the
# packages $4...; extra lines for go.mod (replace directives) come on stdin.
wrapper() {
    local dir=$1 module=$2 version=$3
    shift 3
    mkdir -p "$dir"
    {
        echo "module strait.local/tools/$(basename "$(dirname "$dir")")"
        echo
        echo "go 1.26"
        echo
        echo "require $module $version"
        cat
    } >"$dir/go.mod"
    {
        printf '//go:build tools\n\npackage tools\n\nimport (\n'
        for pkg in "$@"; do printf '\t_ "%s"\n' "$pkg"; done
        printf ')\n'
    } >"$dir/tools.go"
    (cd "$dir" && go mod tidy >"$dir/build.log" 2>&1) || { cat "$dir/build.log" >&2; exit 1; }
}

# Builds package $2 of wrapper module $1 into binary $3.
gobuild() {
    local dir=$1 pkg=$2 out=$3
    (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$out.tmp" "$pkg" >>"$dir/build.log" 2>&1) ||
        { cat "$dir/build.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
}

# Installs $2 (a binary name) from the versioned directory $1 into $bin.
link() {
    mkdir -p "$bin"
    ln -sf "$1/$2" "$bin/$2"
}

etcd() {
    local dir="$cache/etcd-$ETCD_VERSION"
    if [ ! -x "$dir/etcd" ]; then
        echo "==> building etcd $ETCD_VERSION (go.etcd.io/etcd/server/v3) into $dir"
        wrapper "$dir/src" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 </dev/null
        gobuild "$dir/src" go.etcd.io/etcd/server/v3 "$dir/etcd"
        wrapper "$dir/src-ctl" go.etcd.io/etcd/etcdctl/v3 "$ETCD_VERSION" go.etcd.io/etcd/etcdctl/v3 </dev/null
        gobuild "$dir/src-ctl" go.etcd.io/etcd/etcdctl/v3 "$dir/etcdctl"
        echo "==> etcd $ETCD_VERSION built"
    fi
    link "$dir" etcd
    link "$dir" etcdctl
}

kube() {
    local dir="$cache/kubernetes-$KUBE_VERSION"
    if [ ! -x "$dir/kube-apiserver" ] || [ ! -x "$dir/kubectl" ]; then
        echo "==> building kube-apiserver and kubectl $KUBE_VERSION (k8s.io/kubernetes) into $dir"
        # k8s.io/kubernetes replaces each of its staging modules by a path
        # inside its own tree; a wrapper module replaces them by their
        # published releases (v0.<minor>.<patch>) instead.
        local modfile staging
        modfile=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
            sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
        staging="v0.${KUBE_VERSION#v1.}"
        local replaces
        replaces=$(awk -v v="$staging" '
            /^replace \(/ { inblock = 1; next }
            inblock && /^\)/ { inblock = 0 }
            inblock && $2 == "=>" && $3 ~ /^\.\/staging\// { print "replace " $1 " => " $1 " " v }
        ' "$modfile")
        if [ -z "$replaces" ]; then
            echo "scripts/tools.sh: no staging replace block in $modfile" >&2
            exit 1
        fi
        wrapper "$dir/src" k8s.io/kubernetes "$KUBE_VERSION" \
            k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl <<<"$replaces"
        gobuild "$dir/src" k8s.io/kubernetes/cmd/kube-apiserver "$dir/kube-apiserver"
        gobuild "$dir/src" k8s.io/kubernetes/cmd/kubectl "$dir/kubectl"
        echo "==> kube-apiserver and kubectl $KUBE_VERSION built"
    fi
    link "$dir" kube-apiserver
    link "$dir" kubectl
}

helm() {
    local dir="$cache/helm-$HELM_VERSION"
    if [ ! -x "$dir/helm" ]; then
        echo "==> building helm $HELM_VERSION (helm.sh/helm/v4) into $dir"
        wrapper "$dir/src" helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm </dev/null
        gobuild "$dir/src" helm.sh/helm/v4/cmd/helm "$dir/helm"
        echo "==> helm $HELM_VERSION built"
    fi
    link "$dir" helm
}

if ! command -v go >/dev/null 2>&1; then
    echo "scripts/tools.sh: needs Go (1.26) to build the pinned tools" >&2
    exit 1
fi

[ $# -eq 0 ] && set -- all
for what in "$@"; do
    case $what in
    --path) echo "$bin" ;;
    etcd) etcd ;;
    kube) kube ;;
    helm) helm ;;
    all) etcd; kube; helm ;;
    -h | --help) usage ;;
    *) echo "scripts/tools.sh: unknown tool '$what' (etcd, kube, helm, all)" >&2; exit 64 ;;
    esac
done
