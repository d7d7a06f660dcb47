#!/usr/bin/env bash
# Tests the Debian package end to end (issue 15): builds it (scripts/package.sh, which
# reuses what cargo already built), runs lintian on it (warnings and errors fail; the
# overrides in packaging/lintian-overrides must each carry a comment), checks its file
# list, then installs it with apt into a clean Debian bookworm root made by mmdebstrap
# from this machine's Debian mirror (so its Depends resolve from the archive) and checks:
# every file's path, owner and mode; the conffile registered as one; the state dir
# 0700; the guest init static; the unit with `systemd-analyze verify`; the installed
# binary runs and accepts the packaged config; an upgrade keeps a locally edited conffile
# (--force-confold); remove keeps only the conffile and the state, purge leaves nothing;
# and no process runs from the root at any point (nothing the maintainer scripts started).
#
# Usage: sudo scripts/package-test.sh
# Needs root (mmdebstrap, chroot, mounting /proc): without it the script fails, or skips
# when PLFM_PACKAGE_TEST_SKIP_UNPRIVILEGED=1. Installs lintian and mmdebstrap with
# apt-get, cargo-deb with cargo, when missing. With PLFM_REQUIRE_SYSTEM_TESTS=1 (CI) a
# missing prerequisite is a failure, never a skip.
# Env: PLFM_PACKAGE_TEST_MIRROR  a deb822 .sources or sources.list file, or a mirror URL,
#                                for mmdebstrap (default: this machine's Debian sources)
#      PLFM_PACKAGE_TEST_KEEP=1  keep the root (path printed) for inspection
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
start=$SECONDS
say() { echo "package-test: $*" >&2; }
fail() {
  echo "package-test: FAIL: $*" >&2
  exit 1
}
phase() { say "[$((SECONDS - start)) s] $*"; }

# --- prerequisites -------------------------------------------------------------------
if [[ "$(id -u)" -ne 0 ]]; then
  if [[ "${PLFM_PACKAGE_TEST_SKIP_UNPRIVILEGED:-}" == 1 && "${PLFM_REQUIRE_SYSTEM_TESTS:-}" != 1 ]]; then
    say "SKIP: not root (mmdebstrap, chroot and mounting /proc need root)"
    exit 0
  fi
  if [[ "${PLFM_REQUIRE_SYSTEM_TESTS:-}" == 1 ]]; then
    fail "must run as root (mmdebstrap, chroot and mounting /proc need it); PLFM_REQUIRE_SYSTEM_TESTS=1 forbids skipping"
  fi
  fail "must run as root (mmdebstrap, chroot and mounting /proc need it); PLFM_PACKAGE_TEST_SKIP_UNPRIVILEGED=1 skips instead"
fi
command -v apt-get >/dev/null || fail "apt-get not found: this test needs a Debian host"
need_pkgs=()
command -v lintian >/dev/null || need_pkgs+=(lintian)
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
command -v readelf >/dev/null || need_pkgs+=(binutils)
if ((${#need_pkgs[@]})); then
  say "installing ${need_pkgs[*]} (apt-get)"
  apt-get -o DPkg::Lock::Timeout=600 update -qq ||
    fail "apt-get update failed; cannot install ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need_pkgs[@]}" >/dev/null ||
    fail "cannot install ${need_pkgs[*]} with apt-get"
fi

mirror="${PLFM_PACKAGE_TEST_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [[ -f "$f" ]] && grep -Eq '^[^#]*(URIs:|deb ).*debian' "$f"; then
      mirror="$f"
      break
    fi
  done
fi
[[ -n "$mirror" ]] ||
  fail "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set PLFM_PACKAGE_TEST_MIRROR"

# --- build ---------------------------------------------------------------------------
phase "building the package"
deb="$(bash scripts/package.sh | tail -n1)"
[[ -f "$deb" ]] || fail "scripts/package.sh printed no .deb path (got: $deb)"
say "package: $deb ($(du -h "$deb" | cut -f1))"
version="$(dpkg-deb -f "$deb" Version)"

# --- lintian -------------------------------------------------------------------------
phase "lintian"
# Every override must say why: the line above each override is a comment.
awk '!/^#/ && NF && prev !~ /^#/ { bad = bad "\n  " $0 } { prev = $0 } END { if (bad) { print "overrides without a comment above them:" bad; exit 1 } }' \
  packaging/lintian-overrides >&2 || fail "packaging/lintian-overrides: every override needs its reason in a comment line above it"
lintian_out="$(lintian --fail-on error,warning --display-info "$deb" 2>&1)" || {
  echo "$lintian_out" >&2
  fail "lintian reports warnings or errors on $(basename "$deb") (fix them, or override with a reason in packaging/lintian-overrides)"
}
[[ -z "$lintian_out" ]] || say "lintian (info only):"$'\n'"$lintian_out"

# --- the package's file list ---------------------------------------------------------
phase "file list of the .deb"
# path, mode, owner of every regular file the package must ship (man pages apart).
expected_files=(
  "/usr/bin/plfm-node-agent 755"
  "/usr/lib/plfm/plfm-guest-init 755"
  "/etc/plfm/node-agent.toml 644"
  "/usr/lib/systemd/system/plfm-node-agent.service 644"
  "/usr/share/bash-completion/completions/plfm-node-agent 644"
  "/usr/share/zsh/vendor-completions/_plfm-node-agent 644"
  "/usr/share/fish/vendor_completions.d/plfm-node-agent.fish 644"
  "/usr/share/doc/plfm-node-agent/copyright 644"
  "/usr/share/doc/plfm-node-agent/changelog.Debian.gz 644"
  "/usr/share/doc/plfm-node-agent/install.md 644"
  "/usr/share/lintian/overrides/plfm-node-agent 644"
  "/usr/share/man/man1/plfm-node-agent.1.gz 644"
)
declare -A want_mode=()
for e in "${expected_files[@]}"; do want_mode["${e% *}"]="${e##* }"; done
listing="$(dpkg-deb -c "$deb")"
man_pages=0
while read -r perms owner _ _ _ path _; do
  [[ "$perms" == -* ]] || continue # directories and links: not files of their own
  path="${path#.}"
  [[ "$owner" == root/root ]] || fail "$path is owned by $owner in the .deb, not root/root"
  if [[ -z "${want_mode[$path]+x}" ]]; then
    if [[ "$path" == /usr/share/man/man1/plfm-node-agent-*.1.gz ]]; then
      want_mode["$path"]=644
      man_pages=$((man_pages + 1))
    else
      fail "the .deb ships $path, which is not in the expected file list of scripts/package-test.sh"
    fi
  fi
done <<<"$listing"
((man_pages >= 5)) || fail "the .deb has $man_pages subcommand man pages (plfm-node-agent-*.1.gz); expected one per subcommand"
for e in "${expected_files[@]}"; do
  awk '{print $6}' <<<"$listing" | grep -qxF ".${e% *}" || fail "the .deb lacks ${e% *}"
done
dpkg-deb -f "$deb" Depends | grep -q 'e2fsprogs' || fail "Depends lacks e2fsprogs: $(dpkg-deb -f "$deb" Depends)"
for d in nftables iproute2 libc6; do
  dpkg-deb -f "$deb" Depends | grep -q "$d" || fail "Depends lacks $d: $(dpkg-deb -f "$deb" Depends)"
done
for d in qemu-system-x86 linux-image-cloud-amd64 wireguard-go; do
  dpkg-deb -f "$deb" Recommends | grep -q "$d" || fail "Recommends lacks $d: $(dpkg-deb -f "$deb" Recommends)"
done

# --- a clean Debian root -------------------------------------------------------------
root="$(mktemp -d /tmp/plfm-package-test.XXXXXX)"
cleanup() {
  local rc=$?
  # Processes still running from the root (the test has failed then): end them so the
  # root can be removed; they were started inside this test's root, by it.
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/root" 2>/dev/null)" == "$root"* ]] && kill -9 "${p#/proc/}" 2>/dev/null
  done
  # Unmount everything under the root, deepest first.
  awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount "$m" || umount -l "$m"; done
  if [[ "${PLFM_PACKAGE_TEST_KEEP:-}" == 1 ]]; then
    say "root kept: $root"
  elif awk -v r="$root" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    say "not removing $root: something is still mounted under it"
  else
    rm -rf --one-file-system "$root"
  fi
  exit "$rc"
}
trap cleanup EXIT
in_root() { chroot "$root" "$@"; }
# Fails naming any process whose root is the test's root.
no_process_left() {
  local left=""
  for p in /proc/[0-9]*; do
    if [[ "$(readlink "$p/root" 2>/dev/null)" == "$root"* ]]; then
      left+=$'\n'"  pid ${p#/proc/}: $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)"
    fi
  done
  [[ -z "$left" ]] || fail "processes still running in the root after $1:$left"
}

phase "mmdebstrap bookworm (minbase + systemd) into $root from $mirror"
# systemd: a real host has it, and `systemd-analyze verify --root` needs its units
# (sysinit.target, network-online.target). Package lists are kept so apt in the root
# resolves the package's Depends from the archive.
mmdebstrap --quiet --mode=root --variant=minbase --include=systemd \
  --skip=cleanup/apt/lists bookworm "$root" "$mirror" >&2 ||
  fail "mmdebstrap could not make a bookworm root from $mirror"
mount -t proc proc "$root/proc"

phase "apt-get install ./$(basename "$deb") in the root"
cp "$deb" "$root/tmp/"
debname="$(basename "$deb")"
# --no-install-recommends: QEMU and a kernel are recommendations (hundreds of MB) that
# these checks do not need; the Depends must resolve.
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
  "/tmp/$debname" >"$root/tmp/install.log" 2>&1 || {
  cat "$root/tmp/install.log" >&2
  fail "apt-get install of $debname into a clean bookworm root failed"
}
in_root dpkg-query -W -f='${Status}\n' plfm-node-agent | grep -qx 'install ok installed' ||
  fail "plfm-node-agent is not 'install ok installed' after apt-get install"
no_process_left "the install"

# --- installed files -----------------------------------------------------------------
phase "checking the installed files"
check_path() { # path type mode (what stat prints: 755, 700)
  local path="$1" type="$2" mode="$3" got
  [[ -e "$root$path" ]] || fail "$path is missing after the install"
  case "$type" in
    f) [[ -f "$root$path" && ! -L "$root$path" ]] || fail "$path is not a regular file" ;;
    d) [[ -d "$root$path" && ! -L "$root$path" ]] || fail "$path is not a directory" ;;
  esac
  got="$(stat -c '%a %u:%g' "$root$path")"
  [[ "$got" == "$mode 0:0" ]] || fail "$path has mode/owner $got, expected $mode 0:0 (root:root)"
}
for p in "${!want_mode[@]}"; do check_path "$p" f "${want_mode[$p]}"; done
check_path /var/lib/plfm d 700
check_path /usr/lib/plfm d 755
check_path /etc/plfm d 755
check_path /etc/plfm/instances d 755
check_path /etc/plfm/instances/secrets d 700

conffiles="$(in_root dpkg-query --control-show plfm-node-agent conffiles)" ||
  fail "dpkg has no conffiles list for plfm-node-agent"
grep -q '^/etc/plfm/node-agent.toml$' <<<"$conffiles" ||
  fail "/etc/plfm/node-agent.toml is not a conffile (dpkg's conffiles: ${conffiles:-none})"
[[ "$(wc -l <<<"$conffiles")" -eq 1 ]] || fail "unexpected conffiles: $conffiles"

[[ -s "$root/var/lib/dpkg/info/plfm-node-agent.md5sums" ]] || fail "the package has no md5sums (dpkg --verify, debsums need them)"
verify="$(in_root dpkg --verify plfm-node-agent 2>&1)" || fail "dpkg --verify plfm-node-agent fails: $verify"
[[ -z "$verify" ]] || fail "installed files differ from the package's md5sums:"$'\n'"$verify"

# The guest init is PID 1 of an initramfs without a libc: static, no program interpreter.
gi="$root/usr/lib/plfm/plfm-guest-init"
[[ "$(head -c4 "$gi" | od -An -c | tr -d ' ')" == '177ELF' ]] || fail "/usr/lib/plfm/plfm-guest-init is not an ELF file"
if readelf -lW "$gi" | grep -q 'INTERP'; then
  fail "/usr/lib/plfm/plfm-guest-init has a program interpreter: it is dynamically linked"
fi
readelf -dW "$gi" 2>/dev/null | grep -q NEEDED && fail "/usr/lib/plfm/plfm-guest-init needs shared libraries"
for b in /usr/bin/plfm-node-agent /usr/lib/plfm/plfm-guest-init; do
  readelf -SW "$root$b" | grep -q ' \.symtab ' && fail "$b is not stripped (it has a .symtab)"
done

# The unit is installed but not enabled: the node needs configuring first.
[[ ! -e "$root/etc/systemd/system/multi-user.target.wants/plfm-node-agent.service" ]] ||
  fail "the unit was enabled on install; it must wait for the operator (systemctl enable --now)"

phase "systemd-analyze verify"
# --man=no: the man page is checked above as a file; man-db is not in the root.
verify_out="$(systemd-analyze verify --root="$root" --man=no \
  /usr/lib/systemd/system/plfm-node-agent.service 2>&1)" || {
  echo "$verify_out" >&2
  fail "systemd-analyze verify rejects plfm-node-agent.service"
}
# A warning (unknown key, bad value ignored) still exits 0: any output is a failure.
[[ -z "$verify_out" ]] || {
  echo "$verify_out" >&2
  fail "systemd-analyze verify warns about plfm-node-agent.service"
}
grep -q '^ExecStart=/usr/bin/plfm-node-agent --config /etc/plfm/node-agent.toml run$' \
  "$root/usr/lib/systemd/system/plfm-node-agent.service" || fail "the unit's ExecStart is not the packaged binary with the packaged config"

phase "running the installed binary"
v="$(in_root /usr/bin/plfm-node-agent --version)" || fail "plfm-node-agent --version fails in the root"
[[ "$v" == "plfm-node-agent ${version%%-*}" ]] || fail "plfm-node-agent --version says '$v', the package is $version"
in_root /usr/bin/plfm-node-agent check-config >"$root/tmp/check.out" 2>&1 || {
  cat "$root/tmp/check.out" >&2
  fail "the packaged /etc/plfm/node-agent.toml does not pass plfm-node-agent check-config"
}
in_root /usr/bin/plfm-node-agent --help >/dev/null || fail "plfm-node-agent --help fails"
in_root bash -n /usr/share/bash-completion/completions/plfm-node-agent ||
  fail "the bash completion has a syntax error"
zcat "$root/usr/share/man/man1/plfm-node-agent.1.gz" | grep -q '^\.TH' ||
  fail "plfm-node-agent.1.gz is not a man page"
no_process_left "running the binary"

# --- upgrade with a locally edited conffile ------------------------------------------
phase "upgrade keeps a local conffile edit"
# The next version changes the conffile too, so dpkg must choose: --force-confold keeps
# the operator's version and leaves the package's beside it as .dpkg-dist.
up="$root/tmp/upgrade"
dpkg-deb -R "$deb" "$up"
next="${version%-*}-$(( ${version##*-} + 1 ))"
sed -i "s/^Version: .*/Version: $next/" "$up/DEBIAN/control"
echo "# changed by the next version" >>"$up/etc/plfm/node-agent.toml"
(cd "$up" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z | xargs -0 md5sum | sed 's| \./| |') >"$up/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Znone -b "$up" "$root/tmp/next.deb" >/dev/null
rm -rf "$up"
sed -i 's/^level = "info"/level = "debug"   # edited by the operator/' "$root/etc/plfm/node-agent.toml"
grep -q 'edited by the operator' "$root/etc/plfm/node-agent.toml" || fail "could not edit the conffile (test setup)"
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confold /tmp/next.deb >"$root/tmp/upgrade.log" 2>&1 || {
  cat "$root/tmp/upgrade.log" >&2
  fail "upgrading to $next failed"
}
[[ "$(in_root dpkg-query -W -f='${Version}' plfm-node-agent)" == "$next" ]] || fail "the upgrade to $next did not happen"
grep -q 'edited by the operator' "$root/etc/plfm/node-agent.toml" ||
  fail "the upgrade replaced the operator's edit of /etc/plfm/node-agent.toml"
grep -q 'changed by the next version' "$root/etc/plfm/node-agent.toml.dpkg-dist" 2>/dev/null ||
  fail "the new version's conffile is not beside it as node-agent.toml.dpkg-dist"
rm -f "$root/etc/plfm/node-agent.toml.dpkg-dist"
check_path /var/lib/plfm d 700
no_process_left "the upgrade"

# --- remove, purge -------------------------------------------------------------------
phase "remove and purge"
mapfile -t owned < <(in_root dpkg-query -L plfm-node-agent)
: >"$root/var/lib/plfm/state-marker" # stands for the agent's state
in_root apt-get remove -y -q plfm-node-agent >"$root/tmp/remove.log" 2>&1 || {
  cat "$root/tmp/remove.log" >&2
  fail "apt-get remove plfm-node-agent failed"
}
no_process_left "apt-get remove"
# Policy: remove keeps conffiles (and the state); everything else of the package goes.
for p in "${owned[@]}"; do
  [[ -f "$root$p" && "$p" != /etc/plfm/node-agent.toml ]] && fail "$p is still there after apt-get remove"
done
[[ -f "$root/etc/plfm/node-agent.toml" ]] || fail "remove deleted the conffile (only purge may)"
[[ -f "$root/var/lib/plfm/state-marker" ]] || fail "remove deleted the state in /var/lib/plfm (only purge may)"
in_root apt-get purge -y -q plfm-node-agent >"$root/tmp/purge.log" 2>&1 || {
  cat "$root/tmp/purge.log" >&2
  fail "apt-get purge plfm-node-agent failed"
}
no_process_left "apt-get purge"
for p in "${owned[@]}" /var/lib/plfm /etc/plfm /usr/lib/plfm /usr/share/doc/plfm-node-agent \
  /etc/plfm/node-agent.toml.dpkg-old /etc/plfm/node-agent.toml.dpkg-dist; do
  if [[ -e "$root$p" || -L "$root$p" ]] && [[ ! -d "$root$p" || "$p" == *plfm* ]]; then
    fail "$p is still there after apt-get purge"
  fi
done
# Nothing named after the package anywhere in the root (systemd masks and enablement
# state, dpkg's info files, directories the maintainer scripts made), but the test's own
# files in /tmp.
leftover="$(find "$root" -mindepth 1 -path "$root/proc" -prune -o -path "$root/tmp" -prune -o -name '*plfm*' -print)"
[[ -z "$leftover" ]] || fail "after apt-get purge these remain:"$'\n'"${leftover//$root/}"
if in_root dpkg-query -W -f='${Status}' plfm-node-agent 2>/dev/null | grep -q installed; then
  fail "dpkg still lists plfm-node-agent after purge: $(in_root dpkg-query -W -f='${Status}' plfm-node-agent)"
fi

phase "all checks passed (root: $(du -sh --one-file-system "$root" | cut -f1))"
