#!/usr/bin/env bash
# Builds plfm-guest-init as a statically linked release binary for the initramfs and
# prints its path on stdout (the last line; cargo's progress goes to stderr).
#
# Static linking uses glibc's static libc (`-C target-feature=+crt-static` on the gnu
# target). The flag is passed through RUSTFLAGS together with an explicit --target, so it
# applies to the target crates only (not to build scripts or proc macros) and nothing in
# .cargo/config.toml changes the agent's own build. A separate target directory keeps the
# normal debug/release caches intact.
#
# Usage: scripts/build-guest-init.sh            (from anywhere inside the repository)
# Env:   PLFM_GUEST_INIT_TARGET_DIR  target directory (default: <repo>/target/guest-init)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target=x86_64-unknown-linux-gnu
target_dir="${PLFM_GUEST_INIT_TARGET_DIR:-$repo/target/guest-init}"

RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_RELEASE_STRIP=symbols \
CARGO_PROFILE_RELEASE_DEBUG=false \
CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
CARGO_PROFILE_RELEASE_LTO=true \
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
CARGO_PROFILE_RELEASE_PANIC=abort \
  cargo build --manifest-path "$repo/Cargo.toml" --release \
  -p plfm-guest-init --bin plfm-guest-init \
  --target "$target" --target-dir "$target_dir" >&2

out="$target_dir/$target/release/plfm-guest-init"
if ! file_out="$(od -An -c -N4 "$out" 2>/dev/null)" || [[ "$file_out" != *E*L*F* ]]; then
  echo "build-guest-init: $out is not an ELF binary" >&2
  exit 1
fi
if readelf -l "$out" 2>/dev/null | grep -q "Requesting program interpreter"; then
  echo "build-guest-init: $out is dynamically linked" >&2
  exit 1
fi
echo "$out"
