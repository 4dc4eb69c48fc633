#!/usr/bin/env bash
# Daemonless image builds for tests/deploy/test_image.py: podman (runc; overlay or vfs storage) and a local
# Debian bookworm base made by debootstrap, so no registry and no Docker engine are needed.
# Idempotent; a second run with everything in place takes about a second.
#
#   scripts/container_tools.sh [CACHE_DIR]
#
# CACHE_DIR (default $KEEL_CONTAINER_CACHE, else ~/.cache/keel/containers) receives:
#   containers.conf   runtime runc (crun refuses hybrid cgroup hosts), ulimits Ray and vLLM need
#   storage.conf      overlay storage (vfs where overlay is refused) under CACHE_DIR/storage-DRIVER
#   base-bookworm.tar the debootstrap root filesystem (python3 3.11, venv, CA certificates)
# and the base is imported as localhost/keel-base:bookworm. Point podman at the files with
#   CONTAINERS_CONF=CACHE_DIR/containers.conf CONTAINERS_STORAGE_CONF=CACHE_DIR/storage.conf
# The last line of output is the base image's name.
set -euo pipefail

CACHE=${1:-${KEEL_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel/containers}}
BASE=localhost/keel-base:bookworm
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else
    echo "[container-tools] need root (or passwordless sudo) to run: $*" >&2
    return 1
  fi
}

# 1. the tools, from the distribution (Debian 12 ships podman 4.3)
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap newuidmap:uidmap; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[container-tools] installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc debootstrap uidmap >/dev/null
fi

# 2. podman's configuration, in files of our own (the machine's defaults stay untouched)
cat > "$CACHE/containers.conf.tmp" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CACHE/containers.conf.tmp" "$CACHE/containers.conf"
# Storage: native overlay where the kernel gives it to root on this filesystem (layers shared, a
# build takes minutes less), else vfs (a full copy per layer, works anywhere).
driver=${KEEL_PODMAN_DRIVER:-}
if [ -z "$driver" ]; then
  driver=vfs
  if as_root podman --root "$CACHE/probe" --runroot "$CACHE/probe-run" --storage-driver overlay \
      info >/dev/null 2>&1; then
    driver=overlay
  fi
  as_root rm -rf "$CACHE/probe" "$CACHE/probe-run"
fi
cat > "$CACHE/storage.conf.tmp" <<EOF
[storage]
driver = "$driver"
graphroot = "$CACHE/storage-$driver"
runroot = "$CACHE/run-$driver"
EOF
mv "$CACHE/storage.conf.tmp" "$CACHE/storage.conf"
podman_() { as_root env CONTAINERS_CONF="$CACHE/containers.conf" CONTAINERS_STORAGE_CONF="$CACHE/storage.conf" podman "$@"; }

# 3. the base: a minimal bookworm from the mirror apt already uses, kept as a tarball
mirror=${KEEL_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -v security | sed -E 's/^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk 'NR == 1 {print $1}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi
if [ ! -s "$CACHE/base-bookworm.tar" ]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'as_root rm -rf "$root"' EXIT
  echo "[container-tools] debootstrap bookworm from $mirror (about a minute)" >&2
  as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  as_root tar -C "$root" -cf "$CACHE/base-bookworm.tar.tmp" .
  mv "$CACHE/base-bookworm.tar.tmp" "$CACHE/base-bookworm.tar"
fi
if ! podman_ image exists "$BASE"; then
  podman_ import --quiet "$CACHE/base-bookworm.tar" "$BASE" >/dev/null
fi
echo "$BASE"
