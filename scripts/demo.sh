#!/usr/bin/env bash
# The agent's main job, end to end: installs what is missing, builds the agent, runs it
# with config/dev.toml (standalone desired state from config/instances/, mock runtime),
# waits until the example instances are ready and shows them. Ctrl-C stops the agent.
#   scripts/demo.sh          run until Ctrl-C
#   scripts/demo.sh --check  exit 0 once every instance is ready (fails after 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[ "${1:-}" = "--check" ] && check=1
bash scripts/install-deps.sh
cargo build --release -p plfm-node-agent
bin=./target/release/plfm-node-agent
cfg=config/dev.toml
rm -rf .plfm-dev

"$bin" --config "$cfg" &
agent=$!
cleanup() { kill -TERM "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

expected=$(ls config/instances/*.json config/instances/*.toml 2>/dev/null | wc -l)
deadline=$((SECONDS + 10))
until out=$("$bin" --config "$cfg" status --json 2>/dev/null) &&
      [ "$(printf '%s' "$out" | grep -c '"status": "ready"')" -eq "$expected" ]; do
  if [ $SECONDS -ge $deadline ]; then
    echo "demo: instances not ready within 10 s" >&2
    "$bin" --config "$cfg" status >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "demo: all $expected example instances are ready:"
"$bin" --config "$cfg" status
if [ "$check" -eq 1 ]; then
  exit 0
fi
echo "demo: the agent keeps running (API on 127.0.0.1:7070); Ctrl-C to stop it."
wait "$agent"
