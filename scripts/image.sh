#!/usr/bin/env bash
# Builds the strait image (`strait`, `straitctl`, `strait-sidecar`; Debian
# bookworm, uid 65532) on a machine that reaches no container registry:
#
#   1. installs docker.io and debootstrap from Debian (apt) when missing;
#   2. starts dockerd when no engine answers `docker info`, in the
#      background (log and pidfile in the state directory; it keeps
#      running after this script);
#   3. makes the base image strait-base:bookworm once, from Debian's
#      packages: debootstrap --variant=minbase with ca-certificates, curl
#      and iptables, from the mirror apt uses, then `docker import`;
#   4. builds the binaries on the host (cargo build --workspace --bins) and
#      the image from deploy/multicluster/Dockerfile.local in a context
#      that holds only them.
#
# With a registry, deploy/multicluster/Dockerfile builds the same image
# inside Docker instead: docker build -f deploy/multicluster/Dockerfile .
#
# Usage: bash scripts/image.sh [TAG]      (default strait:dev)
# Prints the image name on stdout at the end; progress goes to stderr.
#
#   PROFILE=release|debug|NAME   cargo profile of the binaries (default release)
#   STRAIT_BIN_DIR=DIR           take the three binaries from DIR, build nothing
#   STRIP=0                      keep symbols and debug info (default: the
#                                image's copies are stripped, `strip -s`)
#   STRAIT_DOCKER_STATE=DIR      dockerd's log and pidfile, scratch space
#                                (default ~/.cache/strait/docker)
#   STRAIT_DEBIAN_MIRROR=URL     debootstrap's mirror (default: apt's bookworm one)
#   STRAIT_DOCKERD_WAIT=SECONDS  how long dockerd may take to answer (default 60)
#
# Note: a dockerd started here sets iptables' FORWARD policy to DROP (and
# loads br_netfilter), which drops bridged traffic between network
# namespaces; the netns lab (src/lab/netns.rs) adds its own FORWARD rule
# for its bridge, other bridges need one too (`iptables -S FORWARD`).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-strait:dev}
base=strait-base:bookworm
profile=${PROFILE:-release}
state=${STRAIT_DOCKER_STATE:-$HOME/.cache/strait/docker}
bins=(strait straitctl strait-sidecar)

case $tag in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

say() { echo "==> $*" >&2; }
die() { echo "image.sh: $*" >&2; exit 1; }

scratch=()
cleanup() {
    local dir
    for dir in "${scratch[@]}"; do
        # debootstrap mounts proc and sys inside its target: never delete
        # through a mount that a failed run left behind.
        grep -F " $dir/" /proc/mounts | awk '{print $2}' | sort -r |
            while read -r m; do umount -l "$m" || true; done || true
        rm -rf --one-file-system "$dir"
    done
}
trap cleanup EXIT

updated=
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "$* missing and not root: install them first (apt-get install $*)"
    local start=$SECONDS
    say "installing $* (apt)"
    mkdir -p "$state"
    if [ -z "$updated" ]; then apt-get update -qq; updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$state/apt.log" 2>&1 ||
        { tail -n 20 "$state/apt.log" >&2; die "apt-get install $* failed (log $state/apt.log)"; }
    say "installed $* in $((SECONDS - start)) s"
}

# The bookworm mirror apt uses: one-line sources.list entries first, then
# deb822 .sources paragraphs (Types: deb, Suites: with bookworm).
apt_mirror() {
    local f
    {
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            awk '$1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == "bookworm") print $i
                }' "$f"
        done
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk 'BEGIN { RS = ""; FS = "\n" }
                {
                    uris = ""; suites = ""; types = ""; enabled = "yes"
                    for (j = 1; j <= NF; j++) {
                        if ($j ~ /^URIs:/) { uris = $j; sub(/^URIs:[ \t]*/, "", uris) }
                        if ($j ~ /^Suites:/) suites = $j " "
                        if ($j ~ /^Types:/) types = $j " "
                        if ($j ~ /^Enabled:[ \t]*no/) enabled = "no"
                    }
                    if (enabled == "yes" && types ~ /[ \t]deb[ \t]/ && suites ~ /[ \t]bookworm[ \t]/) {
                        split(uris, u, " "); print u[1]
                    }
                }' "$f"
        done
    } | grep -E '^(https?|file):' | head -n 1
}

# 1 and 2: a docker client and an engine that answers.
command -v docker >/dev/null 2>&1 || apt_install docker.io
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 || apt_install docker.io
    [ "$(id -u)" -eq 0 ] || die "no Docker engine answers and not root: start one first"
    mkdir -p "$state"
    log=$state/dockerd.log
    say "starting dockerd (log $log)"
    start=$SECONDS
    # Not a process group leader here (no job control), so setsid makes
    # dockerd its own session without forking: $! is dockerd.
    setsid dockerd --pidfile "$state/dockerd.pid" >>"$log" 2>&1 </dev/null &
    pid=$!
    deadline=$((SECONDS + ${STRAIT_DOCKERD_WAIT:-60}))
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2
            die "dockerd exited before it answered (log $log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$log" >&2
            die "dockerd (pid $pid) not answering within ${STRAIT_DOCKERD_WAIT:-60} s (log $log)"
        fi
        sleep 0.2
    done
    say "dockerd (pid $pid) answering after $((SECONDS - start)) s"
fi

# 3: the base image, once.
if ! docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root to make $base"
    mirror=${STRAIT_DEBIAN_MIRROR:-$(apt_mirror || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    mkdir -p "$state"
    rootfs=$(mktemp -d "$state/rootfs.XXXXXX")
    scratch+=("$rootfs")
    say "debootstrap bookworm from $mirror (minbase, ca-certificates curl iptables)"
    start=$SECONDS
    debootstrap --variant=minbase --include=ca-certificates,curl,iptables \
        bookworm "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1 ||
        { tail -n 20 "$state/debootstrap.log" >&2; die "debootstrap failed (log $state/debootstrap.log)"; }
    # As debian:bookworm-slim: no package caches, manuals or translations
    # (the copyright files stay).
    rm -rf "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/cache/apt/* "${rootfs:?}"/var/log/* \
        "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* "${rootfs:?}"/usr/share/locale/*
    find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    tar -C "$rootfs" --numeric-owner -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    say "made $base in $((SECONDS - start)) s"
fi

# 4: the binaries and the image.
if [ -n "${STRAIT_BIN_DIR:-}" ]; then
    bindir=$STRAIT_BIN_DIR
else
    case $profile in
        debug|dev) flags=(); dir=debug ;;
        release) flags=(--release); dir=release ;;
        *) flags=(--profile "$profile"); dir=$profile ;;
    esac
    # With the etcd store (its client's build needs protoc).
    command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
    flags+=(--features strait/etcd)
    say "cargo build ${flags[*]} --workspace --bins"
    (cd "$root" && cargo build "${flags[@]}" --workspace --bins)
    bindir=${CARGO_TARGET_DIR:-$root/target}/$dir
fi
mkdir -p "$state"
context=$(mktemp -d "$state/context.XXXXXX")
scratch+=("$context")
for b in "${bins[@]}"; do
    [ -x "$bindir/$b" ] || die "$bindir/$b is not built (cargo build --workspace --bins)"
    if [ "${STRIP:-1}" = 1 ] && command -v strip >/dev/null 2>&1; then
        strip -s -o "$context/$b" "$bindir/$b"
    else
        cp -l "$bindir/$b" "$context/$b" 2>/dev/null || cp "$bindir/$b" "$context/$b"
    fi
done
cp "$root/deploy/multicluster/Dockerfile.local" "$context/Dockerfile"
say "docker build $tag (binaries from $bindir)"
start=$SECONDS
docker build -q --force-rm -t "$tag" "$context" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$tag")
say "built $tag in $((SECONDS - start)) s: $((size / 1000000)) MB"
echo "$tag"
