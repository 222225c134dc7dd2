#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for Ferry: system packages, the Python
# environment in .venv, and the lab guest image. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "ferry setup: must run as root (the lab creates namespaces, bridges and taps)" >&2
  exit 1
fi

PACKAGES=(
  etcd-server etcd-client busybox-static iproute2 iputils-ping
  python3 python3-venv python3-dev gcc libc6-dev make ca-certificates procps psmisc cpio openssl
)
# QEMU from bookworm-backports (10.x): Debian 12's QEMU 7.2 loses guest memory writes when
# it live-migrates a TCG guest that is writing memory (the guest kernel crashes after the
# switchover; measured: 5 of 5 migrations of a guest dirtying 32 MiB, 0 of 15 with 10.0).
# The lab has no usable KVM, so it runs TCG; on KVM hosts the kernel tracks dirty pages.
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
BACKPORTS=/etc/apt/sources.list.d/ferry-backports.list
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

updated=0
apt_update() { [ "$updated" = 1 ] || { apt-get update -q; updated=1; }; }

if [ "$codename" = bookworm ] && ! grep -qs "bookworm-backports" /etc/apt/sources.list \
    /etc/apt/sources.list.d/*.list; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > "$BACKPORTS"
fi
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if ! dpkg --compare-versions "${qemu_version:-0}" ge "1:10"; then
  echo "==> installing QEMU 10 (${codename}-backports where needed)"
  apt_update
  target=()
  [ "$codename" = bookworm ] && target=(-t bookworm-backports)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${target[@]}" "${QEMU_PACKAGES[@]}"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts an etcd service on install; the lab runs its own etcd and does not need it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

stamp=.venv/.ferry-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> creating the Python environment in .venv"
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi

echo "==> lab guest image"
.venv/bin/ferry lab image
