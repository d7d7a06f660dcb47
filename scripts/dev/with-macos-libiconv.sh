#!/usr/bin/env bash
# Runs its arguments. On macOS, first points the linker at Homebrew's libiconv (some
# crates link -liconv and Apple's SDK copy is not always found); elsewhere it only
# passes through. Example: scripts/dev/with-macos-libiconv.sh cargo test -p plfm-node-agent
set -euo pipefail
if [ "$(uname -s)" = "Darwin" ]; then
  prefix=$(brew --prefix libiconv 2>/dev/null || echo /opt/homebrew/opt/libiconv)
  export LIBRARY_PATH="$prefix/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$prefix/lib"
fi
exec "$@"
