#!/usr/bin/env bash
# Bounded fuzzing, as CI runs it: builds the fuzz targets the way `cargo fuzz build`
# does (libFuzzer, AddressSanitizer, SanitizerCoverage, debug assertions) with the
# stable toolchain and RUSTC_BOOTSTRAP=1, so no cargo-fuzz is needed, then runs each
# target for PLFM_FUZZ_SECONDS (default 60) from its committed corpus. Any crash, leak,
# timeout or out-of-memory fails the script; the reproducer is kept under
# PLFM_FUZZ_ARTIFACTS (default target/fuzz-artifacts), replay it with
#   target/fuzz/<host>/release/<target> <artifact>
#
# Usage: scripts/fuzz.sh [TARGET...]   (default: all; targets: unpack_paths guest_frames)
# Environment: PLFM_FUZZ_SECONDS, PLFM_FUZZ_ARTIFACTS, PLFM_FUZZ_TARGET_DIR (build dir
# shared by both fuzz crates, so common dependencies build once; default target/fuzz),
# PLFM_FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=2 -workers=2"), PLFM_FUZZ_OPT_LEVEL
# (default 3, as cargo fuzz; CI uses 1: the ASan build of the agent and its whole
# dependency tree took 13.8 min at 3 and 11.4 min at 1 on a 2-core machine, for 20 %
# fewer executions a second in its 60 s).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${PLFM_FUZZ_SECONDS:-60}
opt_level=${PLFM_FUZZ_OPT_LEVEL:-3}
artifacts=${PLFM_FUZZ_ARTIFACTS:-$root/target/fuzz-artifacts}

# target name -> fuzz crate directory
declare -A CRATE=(
  [unpack_paths]=crates/node-agent/fuzz
  [guest_frames]=crates/guest-protocol/fuzz
)
ORDER=(unpack_paths guest_frames)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${ORDER[@]}")
for t in "${targets[@]}"; do
  [ -n "${CRATE[$t]:-}" ] || { echo "fuzz: unknown target $t (known: ${ORDER[*]})" >&2; exit 2; }
done

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate.
if ! command -v c++ >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "fuzz: installing g++ (libFuzzer is C++)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
  else
    echo "fuzz: a C++ compiler (c++) is needed to build libFuzzer" >&2
    exit 1
  fi
fi

host=$(rustc -vV | sed -n 's/^host: //p')
# The flags cargo-fuzz 0.13 passes for `cargo fuzz build` (ASan, default options).
# --target keeps them off build scripts and proc macros.
FUZZ_RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Zsanitizer=address \
-Cdebug-assertions \
-Coverflow-checks \
-Cforce-frame-pointers"

# Not --locked: a fuzz crate's Cargo.lock (committed) must follow its parent crate's
# dependencies, and cargo only adds what changed to it.
build() { # crate dir, target
  local dir=$1 t=$2 tdir
  tdir=${PLFM_FUZZ_TARGET_DIR:-$root/target/fuzz}
  echo "fuzz: building $t ($dir)" >&2
  (cd "$dir" && RUSTC_BOOTSTRAP=1 RUSTFLAGS="$FUZZ_RUSTFLAGS" CARGO_TARGET_DIR="$tdir" \
    CARGO_PROFILE_RELEASE_OPT_LEVEL="$opt_level" \
    cargo build --release --quiet --target "$host" --bin "$t")
  BIN=$tdir/$host/release/$t
}

mkdir -p "$artifacts"
failed=()
for t in "${targets[@]}"; do
  dir=${CRATE[$t]}
  build "$dir" "$t"
  # New inputs go to a scratch dir; the committed corpus is only read.
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/plfm-fuzz-$t.XXXXXX")
  echo "fuzz: running $t for ${seconds}s from $dir/corpus/$t" >&2
  # shellcheck disable=SC2086 # PLFM_FUZZ_ARGS is a list of flags
  if (cd "$scratch" && "$BIN" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2560 \
      -print_final_stats=1 -artifact_prefix="$artifacts/$t-" ${PLFM_FUZZ_ARGS:-} \
      "$scratch" "$root/$dir/corpus/$t"); then
    echo "fuzz: $t: no crash in ${seconds}s" >&2
  else
    echo "fuzz: $t FAILED; reproducer(s) in $artifacts:" >&2
    ls -l "$artifacts" | grep -F "$t-" >&2 || true
    failed+=("$t")
  fi
  rm -rf "$scratch"
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
