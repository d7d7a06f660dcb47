#!/usr/bin/env bash
# shellcheck disable=SC2317  # trap handlers look unreachable to shellcheck 0.9
# The agent's main job with a real microVM, end to end:
#   1. installs what is missing (scripts/install-deps.sh), builds the agent and the
#      static guest init (the agent builds the initramfs from it and the installed cloud
#      kernel's modules when it starts);
#   2. starts a docker-registry on 127.0.0.1:5055 and pushes a demo image built here
#      with umoci + skopeo (busybox-static httpd serving /www on port 8080);
#   3. writes the instance spec (with the pushed digest) into .plfm-demo/desired and runs
#      the agent with config/demo.toml (config/dev.toml switched to the qemu runtime, TCG);
#   4. waits until the instance is `ready` (HTTP health check passed), shows `status`
#      with its addresses, fetches the page from the VM with curl, reads the same
#      file inside the VM with `exec` and shows the last lines of its log;
#   5. Ctrl-C (SIGINT) or SIGTERM: the agent drains and stops the VM (`on_shutdown = "drain"`), the
#      registry stops, and the script checks that no VM process, tap, nftables chain or
#      mount is left; it exits 0 only then.
#
# Usage (root, Linux; the VM needs taps and nftables):
#   scripts/demo.sh           run until Ctrl-C
#   scripts/demo.sh --check   non-interactive (CI): after the page was fetched, take the
#                             Ctrl-C path at once; exit 0 only if everything worked
#   scripts/demo.sh --netns   (with or without --check) run registry, agent and VM in a
#                             network namespace of their own, `plfm-demo`, deleted at exit
#                             (then use `ip netns exec plfm-demo …` to curl or run status)
# Without --netns everything runs in the current network namespace, e.g. the host's or
# one made by the caller (`ip netns add x; ip netns exec x scripts/demo.sh --check`).
# Traffic goes only to loopback and to the VM (169.254.100.0/24, fd00::/8 addresses).
# State lives in .plfm-demo/ (removed and recreated on every run; leftovers of an
# interrupted run, including its processes, are cleaned up first). Logs:
# .plfm-demo/agent.log, .plfm-demo/registry.log, .plfm-demo/data/instances/*/console.log.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

check=0
netns=0
for a in "$@"; do
  case "$a" in
    --check) check=1 ;;
    --netns) netns=1 ;;
    -h|--help) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'demo: %s\n' "$*" >&2; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- what the demo needs ------------------------------------------------------------
[ "$(uname -s)" = "Linux" ] || die "needs Linux (QEMU microVMs, taps, nftables); this is $(uname -s)"
[ "$(id -u)" -eq 0 ] || die "needs root: the VM's tap, its addresses and the nftables rules need CAP_NET_ADMIN (run: sudo $0 $*)"

demo="$repo/.plfm-demo"         # everything of a run; removed at the start of the next
jails="/run/plfm-node-agent/demo-jails"  # config/demo.toml's runtime.qemu.jail_dir
cfg="$repo/config/demo.toml"
bin="$repo/target/release/plfm-node-agent"
ns_name="plfm-demo"
registry_addr="127.0.0.1:5055"  # must match nothing else; tests use free ports
instance="demo-web-1"
overlay_ipv6="fd00:0:0:de::10"  # fd00::/8, outside the host's usual fd00::/64
ready_deadline_s="${PLFM_DEMO_READY_DEADLINE_S:-180}"

# The tap the agent derives for the instance (network.rs: "plfm" + 11 hex of sha256(id)).
tap="plfm$(printf '%s' "$instance" | sha256sum | cut -c1-11)"

# Processes of this demo: anything whose command line names the demo dir or the demo
# config (registry, agent, QEMU, vhost-device-vsock), except this script and its parents.
demo_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$$" ] && continue
    [ "$p" = "$BASHPID" ] && continue
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" || continue
    case "$cmd" in
      *"$repo/.plfm-demo"*|*"$repo/config/../.plfm-demo"*|*"$cfg"*|*"$jails/"*) ;;
      *) continue ;;
    esac
    case "$cmd" in *"scripts/demo.sh"*) continue ;; esac
    # Zombies have an empty cmdline and never match.
    echo "$p"
  done | tr '\n' ' ' | sed 's/ $//'
}

# ---- phase 1 (current namespace, may need the network): install and build -----------
if [ -z "${PLFM_DEMO_STAGE:-}" ]; then
  bash scripts/install-deps.sh
  for tool in qemu-system-x86_64 vhost-device-vsock docker-registry mkfs.ext4 nft ip skopeo umoci curl sqlite3 setsid sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (scripts/install-deps.sh should have installed it)"
  done
  [ -x /bin/busybox ] || die "/bin/busybox is missing (Debian package busybox-static)"
  [ -e /dev/net/tun ] || die "/dev/net/tun is missing (the tun kernel module)"

  say "building the agent (cargo build --release -p plfm-node-agent)"
  cargo build --release -p plfm-node-agent
  say "building the static guest init (scripts/build-guest-init.sh)"
  guest_init="$(bash scripts/build-guest-init.sh | tail -n 1)"
  [ -x "$guest_init" ] || die "scripts/build-guest-init.sh did not produce a binary ($guest_init)"
  export PLFM_DEMO_GUEST_INIT="$guest_init"

  # Leftover namespace of an interrupted --netns run: end its processes, delete it.
  if ip netns list | grep -qw "^$ns_name"; then
    say "removing network namespace $ns_name left by an earlier demo run"
    for p in $(ip netns pids "$ns_name" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns_name" || true
  fi
  if [ "$netns" -eq 1 ]; then
    ip netns add "$ns_name"
    del_ns() { ip netns del "$ns_name" 2>/dev/null || true; }
    trap del_ns EXIT
    # A handler (not "ignore") so that the inner script can still trap Ctrl-C itself;
    # the outer one just waits for it.
    trap 'true' INT TERM
    say "entering network namespace $ns_name (run curl/status with: ip netns exec $ns_name …)"
    rc=0
    PLFM_DEMO_STAGE=run PLFM_DEMO_NETNS="$ns_name" \
      ip netns exec "$ns_name" bash "$0" "$@" || rc=$?
    del_ns
    trap - EXIT
    exit "$rc"
  fi
fi

# ---- phase 2 (the namespace the demo runs in): set up, run, check ------------------
guest_init="${PLFM_DEMO_GUEST_INIT:?}"
# The network may be fresh (`ip netns add`): loopback starts down there.
if ! ip -o link show lo | grep -q '[<,]UP[,>]'; then
  say "bringing up lo in this network namespace"
  ip link set lo up
fi

agent_pid=""
registry_pid=""
stage="setup"

# Removes what an earlier, interrupted run left: its processes, the instance's tap and
# nftables chain (only ours, by name), and the demo dir.
clean_leftovers() {
  local pids
  pids="$(demo_pids)"
  if [ -n "$pids" ]; then
    say "ending processes of an earlier demo run: $pids"
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.5
  fi
  if ip link show "$tap" >/dev/null 2>&1; then
    say "removing tap $tap left by an earlier demo run"
    ip link del "$tap" || true
  fi
  if nft list chain inet plfm "$tap" >/dev/null 2>&1; then
    say "removing nftables chain $tap left by an earlier demo run"
    nft delete element inet plfm taps "{ \"$tap\" }" 2>/dev/null || true
    nft delete chain inet plfm "$tap" 2>/dev/null || true
  fi
  # The table itself, when the earlier run's agent created it and no tap is left in it.
  if [ -f "$demo/nft-table-by-demo" ] && nft list table inet plfm >/dev/null 2>&1 &&
     ! nft list map inet plfm taps 2>/dev/null | grep -q 'elements'; then
    say "removing the nftables table inet plfm an earlier demo run created"
    nft delete table inet plfm || true
  fi
  # Its ARP companion (sender addresses per tap), under the same rule.
  if [ -f "$demo/nft-table-by-demo" ] && nft list table arp plfm >/dev/null 2>&1 &&
     ! nft list set arp plfm senders 2>/dev/null | grep -q 'elements'; then
    nft delete table arp plfm || true
  fi
  if grep -q " $demo" /proc/self/mountinfo; then
    grep " $demo" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount -l "$m" || true; done
  fi
  rm -rf "$demo"
}

instance_status() {
  "$bin" --config "$cfg" status --json 2>/dev/null
}

console_tail() {
  local f
  for f in "$demo"/data/instances/*/console.log; do
    [ -f "$f" ] || continue
    echo "--- last lines of $f:"
    tail -n 25 "$f"
  done
  for f in "$demo"/data/instances/*/qemu.log; do
    [ -s "$f" ] || continue
    echo "--- $f:"
    tail -n 10 "$f"
  done
  if [ -f "$demo/agent.log" ]; then
    echo "--- last lines of $demo/agent.log:"
    tail -n 25 "$demo/agent.log"
  fi
}

# Everything that must be gone once the agent has drained and exited.
verify_nothing_left() {
  local bad=0 pids links mounts
  say "checking that nothing is left behind:"
  pids="$(demo_pids)"
  if [ -n "$pids" ]; then
    say "  LEFT: processes of the demo: $pids"
    ps -o pid,args -p "${pids// /,}" >&2 || true
    bad=1
  else
    say "  ok: no agent, registry, qemu-system-x86_64 or vhost-device-vsock process of $demo"
  fi
  links="$(ip -o link show | awk -F': ' '{print $2}' | grep '^plfm' | tr '\n' ' ' || true)"
  if ip link show "$tap" >/dev/null 2>&1; then
    say "  LEFT: tap $tap"
    bad=1
  else
    say "  ok: no tap $tap${links:+ (other plfm links here, not from the demo: ${links% })}"
  fi
  if nft list chain inet plfm "$tap" >/dev/null 2>&1; then
    say "  LEFT: nftables chain inet plfm $tap"
    bad=1
  elif nft list table inet plfm 2>/dev/null | grep -q "$tap"; then
    say "  LEFT: nftables table inet plfm still mentions $tap"
    bad=1
  elif nft list set arp plfm senders 2>/dev/null | grep -q "$tap"; then
    say "  LEFT: ARP sender entry of $tap in table arp plfm"
    bad=1
  else
    say "  ok: no nftables chain or rule for $tap"
    if [ "$nft_table_before" -eq 0 ] && nft list table inet plfm >/dev/null 2>&1; then
      if nft list map inet plfm taps 2>/dev/null | grep -q 'elements'; then
        say "  (table inet plfm still maps other taps; left in place)"
      else
        nft delete table inet plfm && say "  ok: removed the (now empty) nftables table inet plfm the demo's agent created"
      fi
    fi
    if [ "$nft_arp_before" -eq 0 ] && nft list table arp plfm >/dev/null 2>&1; then
      if nft list set arp plfm senders 2>/dev/null | grep -q 'elements'; then
        say "  (table arp plfm still lists other taps; left in place)"
      else
        nft delete table arp plfm && say "  ok: removed the (now empty) nftables table arp plfm the demo's agent created"
      fi
    fi
  fi
  mounts="$(grep -c " $demo" /proc/self/mountinfo || true)"
  if [ "${mounts:-0}" -ne 0 ]; then
    say "  LEFT: $mounts mount(s) under $demo"
    bad=1
  else
    say "  ok: no mount under $demo"
  fi
  if [ -e "$demo/data/instances/$instance/scratch.ext4" ]; then
    say "  LEFT: scratch disk $demo/data/instances/$instance/scratch.ext4"
    bad=1
  else
    say "  ok: no scratch disk"
  fi
  return "$bad"
}

# Runs on every exit: drain (SIGINT to the agent), stop the registry, verify.
on_exit() {
  local rc=$? left=0 drain_bad=0 agent_rc=0 i
  trap - EXIT
  trap '' INT TERM   # a second Ctrl-C must not interrupt the drain and the checks
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    say "Ctrl-C path: SIGINT to the agent (pid $agent_pid): it drains and stops the VM, then exits"
    local t0=$SECONDS
    kill -INT "$agent_pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
      kill -0 "$agent_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$agent_pid" 2>/dev/null; then
      say "FAILED: the agent did not exit within 60 s of SIGINT; killing it"
      kill -9 "$agent_pid" 2>/dev/null || true
      drain_bad=1
    fi
    wait "$agent_pid" 2>/dev/null || agent_rc=$?
    if [ "$agent_rc" -ne 0 ]; then
      say "FAILED: the agent exited with status $agent_rc"
      drain_bad=1
    else
      say "the agent drained and exited (status 0) in $((SECONDS - t0)) s"
    fi
    grep -E "shutting down|agent stopped" "$demo/agent.log" 2>/dev/null | tail -n 4 | sed 's/^/  agent.log: /' >&2 || true
    # The statuses the agent reported (its durable outbox), e.g. booting → ready →
    # draining → stopped; with the API gone, read from state.db.
    local reported
    reported="$(sqlite3 -readonly "$demo/data/state.db" \
      "select json_extract(report_json, '\$.status') || coalesce(' (' || json_extract(report_json, '\$.reason_code') || ')', '') from reports where instance_id = '$instance' order by seq" 2>/dev/null |
      paste -sd, - | sed 's/,/ -> /g' || true)"
    if [ -n "$reported" ]; then
      say "statuses reported for $instance: $reported"
      if [ "$stage" = "served" ] || [ "$stage" = "waiting" ]; then
        if [ "${reported##* -> }" != "stopped (node_draining)" ]; then
          say "FAILED: $instance did not end stopped by the drain"
          drain_bad=1
        fi
      fi
    fi
  fi
  if [ -n "$registry_pid" ] && kill -0 "$registry_pid" 2>/dev/null; then
    kill -TERM "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    say "registry stopped"
  fi
  if [ "$stage" != "setup" ] || [ -d "$demo/data" ]; then
    # Give VM processes that are on their way out a moment before judging.
    for ((i = 0; i < 50; i++)); do
      [ -z "$(demo_pids)" ] && break
      sleep 0.1
    done
    verify_nothing_left || left=1
    if [ "$left" -ne 0 ]; then
      say "cleaning up what was left (kill the processes, delete the tap and chain)"
      clean_leftovers_keep_dir
      [ "$rc" -eq 0 ] && rc=1
      say "FAILED: the demo left something behind (see above)"
    fi
  fi
  [ "$drain_bad" -eq 0 ] || [ "$rc" -ne 0 ] || rc=1
  if [ "$rc" -eq 0 ]; then
    say "done: the VM was drained and stopped, nothing left behind"
  elif [ "$rc" -eq 130 ]; then
    say "interrupted before the page was served (exit 130); cleaned up as above"
  fi
  exit "$rc"
}

clean_leftovers_keep_dir() {
  local pids
  pids="$(demo_pids)"
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  ip link del "$tap" 2>/dev/null || true
  nft delete element inet plfm taps "{ \"$tap\" }" 2>/dev/null || true
  nft delete chain inet plfm "$tap" 2>/dev/null || true
}

clean_leftovers
# The agent creates the nftables table `inet plfm` and keeps it (empty) after its last
# VM; when the demo made it, the demo removes it again at the end.
nft_table_before=0
nft list table inet plfm >/dev/null 2>&1 && nft_table_before=1
nft_arp_before=0
nft list table arp plfm >/dev/null 2>&1 && nft_arp_before=1
trap on_exit EXIT
trap 'exit 130' INT TERM
mkdir -p "$demo"/{guest,registry,desired/secrets,image}
# Remembered for the next run, should this one be killed before it cleans up.
[ "$nft_table_before" -eq 1 ] || : >"$demo/nft-table-by-demo"

# ---- guest kernel and initramfs ------------------------------------------------------
kernel="$(printf '%s\n' /boot/vmlinuz-*-cloud-amd64 | grep -v '\*' | sort -V | tail -n 1 || true)"
[ -n "$kernel" ] || die "no /boot/vmlinuz-*-cloud-amd64 (Debian package linux-image-cloud-amd64)"
modules="/lib/modules/${kernel#/boot/vmlinuz-}"
[ -f "$modules/modules.dep" ] || die "$modules/modules.dep is missing (modules of $kernel)"
ln -s "$kernel" "$demo/guest/vmlinuz"
# Where the package installs it (/usr/lib/plfm/plfm-guest-init). The agent builds the
# initramfs itself at start from it and the kernel's modules, into data/guest/.
install -m 0755 "$guest_init" "$demo/guest/plfm-guest-init"
"$bin" check-config --config "$cfg" >/dev/null || die "config/demo.toml is not valid (see above)"

# ---- registry on loopback ------------------------------------------------------------
cat >"$demo/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $demo/registry/storage
http:
  addr: $registry_addr
EOF
if (exec 3<>"/dev/tcp/${registry_addr%:*}/${registry_addr#*:}") 2>/dev/null; then
  die "something already listens on $registry_addr (the demo's registry port)"
fi
# Own session: a Ctrl-C from the terminal reaches only this script, which stops the
# agent first (one SIGINT) and the registry after it.
setsid docker-registry serve "$demo/registry/config.yml" </dev/null >"$demo/registry.log" 2>&1 &
registry_pid=$!
for ((i = 0; ; i++)); do
  curl -fsS --noproxy '*' -o /dev/null "http://$registry_addr/v2/" 2>/dev/null && break
  kill -0 "$registry_pid" 2>/dev/null || { tail -n 20 "$demo/registry.log" >&2; die "docker-registry exited"; }
  [ "$i" -lt 150 ] || die "docker-registry does not answer on $registry_addr within 15 s"
  sleep 0.1
done
say "docker-registry serves on $registry_addr (storage $demo/registry/storage)"

# ---- the demo image: busybox httpd, built with umoci, pushed with skopeo -------------
layout="$demo/image/layout"
bundle="$demo/image/bundle"
umoci init --layout "$layout"
umoci new --image "$layout:demo"
umoci unpack --image "$layout:demo" "$bundle" >/dev/null
rootfs="$bundle/rootfs"
mkdir -p "$rootfs"/{bin,www,tmp,proc,sys,dev,run,etc}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in sh httpd echo cat mkdir uname hostname date sleep; do
  ln -s busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/www/index.html" <<'EOF'
hello from plfm demo: busybox httpd inside a QEMU microVM run by plfm-node-agent
EOF
umoci repack --image "$layout:demo" "$bundle" >/dev/null
# The workload adds an instance-specific line (env from the spec, the guest's kernel).
# shellcheck disable=SC2016  # expanded by the guest's shell, not here
umoci config --image "$layout:demo" --os linux --architecture amd64 \
  --config.env PATH=/bin --config.exposedports 8080/tcp \
  --config.cmd /bin/sh --config.cmd -c \
  --config.cmd 'echo "instance $DEMO_INSTANCE, guest kernel $(uname -r)" >> /www/index.html && exec httpd -f -p 8080 -h /www'
image_ref="$registry_addr/plfm-demo/httpd:latest"
skopeo copy --quiet --dest-tls-verify=false --digestfile "$demo/image/digest" \
  "oci:$layout:demo" "docker://$image_ref"
digest="$(cat "$demo/image/digest")"
case "$digest" in sha256:*) ;; *) die "skopeo wrote no manifest digest ($digest)" ;; esac
say "pushed $image_ref ($digest)"

# ---- the instance spec ---------------------------------------------------------------
tmp_spec="$demo/desired/.$instance.json.tmp"
cat >"$tmp_spec" <<EOF
{
  "instance_id": "$instance",
  "generation": 1,
  "desired_state": "running",
  "drain_grace_seconds": 5,
  "workload": {
    "spec_version": "v1",
    "instance_id": "$instance",
    "generation": 1,
    "image": {
      "ref": "$image_ref",
      "digest": "$digest",
      "resolved_digest": "$digest",
      "os": "linux",
      "arch": "amd64"
    },
    "env_vars": { "DEMO_INSTANCE": "$instance" },
    "resources": { "cpu_request": 1.0, "memory_limit_bytes": 268435456, "ephemeral_disk_bytes": 67108864, "vcpu_count": 1 },
    "network": { "overlay_ipv6": "$overlay_ipv6", "gateway_ipv6": "fe80::1", "mtu": 1400 },
    "health": {
      "type": "http", "port": 8080, "path": "/",
      "interval_seconds": 1, "timeout_seconds": 2, "grace_period_seconds": 120,
      "success_threshold": 1, "failure_threshold": 3
    },
    "lifecycle": { "termination_grace_seconds": 5, "restart_policy": "never", "max_retries": 0 }
  }
}
EOF
mv "$tmp_spec" "$demo/desired/$instance.json"

# ---- the agent -----------------------------------------------------------------------
stage="running"
say "starting the agent: $bin --config config/demo.toml (log: .plfm-demo/agent.log)"
NO_COLOR=1 setsid "$bin" --config "$cfg" </dev/null >"$demo/agent.log" 2>&1 &
agent_pid=$!
t_start=$SECONDS
say "waiting for $instance to be ready (TCG boot; deadline ${ready_deadline_s} s)"
last=""
while :; do
  kill -0 "$agent_pid" 2>/dev/null || { console_tail >&2; die "the agent exited (see .plfm-demo/agent.log above)"; }
  out="$(instance_status || true)"
  st="$(printf '%s' "$out" | grep -o '"status": "[a-z_]*"' | head -n 1 | cut -d'"' -f4 || true)"
  if [ -n "$st" ] && [ "$st" != "$last" ]; then
    say "  $instance: $st after $((SECONDS - t_start)) s"
    last="$st"
  fi
  case "$st" in
    ready) break ;;
    failed|stopped)
      printf '%s\n' "$out" >&2
      console_tail >&2
      die "$instance is $st: reason $(printf '%s' "$out" | grep -o '"reason_code": "[a-z_]*"' | cut -d'"' -f4)"
      ;;
  esac
  if [ $((SECONDS - t_start)) -ge "$ready_deadline_s" ]; then
    printf '%s\n' "$out" >&2
    console_tail >&2
    die "$instance not ready within ${ready_deadline_s} s (last status: ${st:-none})"
  fi
  sleep 0.5
done
say "$instance is ready after $((SECONDS - t_start)) s"

echo
echo "\$ plfm-node-agent --config config/demo.toml status"
"$bin" --config "$cfg" status
echo
echo "\$ plfm-node-agent --config config/demo.toml status --json"
out="$(instance_status)"
printf '%s\n' "$out"
ipv4="$(printf '%s' "$out" | grep -o '"ipv4": "[0-9.]*"' | head -n 1 | cut -d'"' -f4 || true)"
ipv6="$(printf '%s' "$out" | grep -o '"ipv6": "[0-9a-f:]*"' | head -n 1 | cut -d'"' -f4 || true)"
[ -n "$ipv4" ] || die "status --json shows no IPv4 address for $instance"

echo
echo "\$ curl http://$ipv4:8080/"
page="$(curl -fsS --noproxy '*' --max-time 10 --retry 3 --retry-delay 1 --retry-connrefused "http://$ipv4:8080/")" || {
  console_tail >&2
  die "the page is not served at http://$ipv4:8080/"
}
printf '%s\n' "$page"
case "$page" in
  *"hello from plfm demo"*"instance $instance"*) ;;
  *) die "unexpected page from http://$ipv4:8080/" ;;
esac
if [ -n "$ipv6" ]; then
  echo
  echo "\$ curl http://[$ipv6]:8080/"
  if page6="$(curl -fsS --noproxy '*' --max-time 5 -g "http://[$ipv6]:8080/")"; then
    printf '%s\n' "$page6"
  else
    say "(IPv6 fetch failed; the IPv4 link is what the health check uses)"
  fi
fi
echo
echo "\$ plfm-node-agent --config config/demo.toml exec $instance -- cat /www/index.html"
exec_out="$("$bin" --config "$cfg" exec "$instance" -- cat /www/index.html)" || die "exec into $instance failed"
printf '%s\n' "$exec_out"
case "$exec_out" in
  *"instance $instance"*) ;;
  *) die "exec into $instance did not show the page the VM serves" ;;
esac
echo
echo "\$ plfm-node-agent --config config/demo.toml logs --tail 5 $instance"
log_out="$("$bin" --config "$cfg" logs --tail 5 "$instance")" || die "logs of $instance failed"
printf '%s\n' "$log_out"
[ -n "$log_out" ] || die "logs of $instance are empty (guest init's console lines should be there)"
echo

ns_prefix=""
[ -n "${PLFM_DEMO_NETNS:-}" ] && ns_prefix="ip netns exec $PLFM_DEMO_NETNS "
stage="served"
if [ "$check" -eq 1 ]; then
  say "check mode: taking the Ctrl-C path now"
  exit 0
fi

stage="waiting"
echo "The VM keeps running. From another shell:"
echo "  ${ns_prefix}curl http://$ipv4:8080/"
echo "  ${ns_prefix}./target/release/plfm-node-agent --config config/demo.toml status --json"
echo "Ctrl-C to drain and stop"
# A shell started with `cmd &` (no job control) hands SIGINT down ignored, and bash
# cannot trap a signal ignored at entry; SIGTERM takes the same path.
if [ $(( 0x$(awk '/^SigIgn:/ {print $2}' /proc/$$/status) & 2 )) -ne 0 ]; then
  say "note: SIGINT is ignored in this process (started in the background?); send SIGTERM instead"
fi
interrupted=0
trap 'interrupted=1' INT TERM
while [ "$interrupted" -eq 0 ] && kill -0 "$agent_pid" 2>/dev/null; do
  wait "$agent_pid" 2>/dev/null || true
done
if [ "$interrupted" -eq 0 ]; then
  console_tail >&2
  die "the agent exited on its own (see .plfm-demo/agent.log)"
fi
echo
exit 0
