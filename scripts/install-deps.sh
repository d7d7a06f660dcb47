#!/usr/bin/env bash
# Installs what building and testing the agent needs, when it is missing.
# Debian/Ubuntu (as root or with sudo): system packages for the real-component tests.
# Any OS: the rustfmt and clippy components. Idempotent and quiet when all is there.
set -euo pipefail

# Debian packages the tests and the demo use (see docs/runbooks/node-agent-testing.md).
DEB_PACKAGES=(
  e2fsprogs        # mkfs.ext4 -d, debugfs: root disks
  docker-registry  # a real OCI registry on loopback
  busybox-static   # test and demo images
  cpio             # initramfs inspection
  binutils         # strip: tests/overlay_kernel.rs boots its own binary as a VM's init
  iproute2         # ip netns, taps
  nftables         # host firewall rules
  wireguard-go     # the overlay's userspace WireGuard (tests/overlay_device.rs)
  qemu-system-x86  # real VMs under TCG
  linux-image-cloud-amd64  # the guest kernel and its modules
  skopeo umoci     # reference tools the image benchmark compares against
  curl             # the demo fetches the page from the VM
  sqlite3          # the demo shows the statuses the agent reported (state.db)
  ca-certificates
)

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "install-deps: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "install-deps: not a Debian-like Linux; system tests will say what they miss" >&2
fi

# vhost-device-vsock: the vsock backend QEMU's vhost-user-vsock-device talks to. It
# runs as an unprivileged per-instance uid, so as root it goes to /usr/local/bin (a
# copy in ~/.cargo/bin under /root, mode 0700, cannot be executed by that uid).
if [ "$(uname -s)" = "Linux" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    if [ ! -x /usr/local/bin/vhost-device-vsock ]; then
      existing="$(command -v vhost-device-vsock || true)"
      if [ -n "$existing" ]; then
        echo "install-deps: copying $existing to /usr/local/bin" >&2
        install -m 0755 "$existing" /usr/local/bin/vhost-device-vsock
      else
        echo "install-deps: cargo install vhost-device-vsock into /usr/local" >&2
        cargo install --locked --quiet --root /usr/local vhost-device-vsock --version 0.3.0
      fi
    fi
  elif ! command -v vhost-device-vsock >/dev/null 2>&1; then
    echo "install-deps: cargo install vhost-device-vsock" >&2
    cargo install --locked --quiet vhost-device-vsock --version 0.3.0
  fi
fi

if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
