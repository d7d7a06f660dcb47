#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then format check,
# clippy with warnings denied, and every test of the workspace.
# Set PLFM_REQUIRE_SYSTEM_TESTS=1 to make a missing system prerequisite (root, QEMU,
# registry, kernel) a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
