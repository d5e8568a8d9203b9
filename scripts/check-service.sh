#!/usr/bin/env bash
# The service under a real systemd 252 as PID 1 (../shared/tools/systemd-sandbox; root; ~5 min,
# most of it building /opt/kvmm): install-service.sh inside, kvmm.socket started, a generate
# from an ordinary user in group kvmm, that user's session listed in the view (and not
# another's), kvmm stats and systemctl status, a clean stop, the watchdog restarting a
# SIGSTOPped engine, then --uninstall --purge and the sandbox down, also on failure.
#
#   bash scripts/check-service.sh            (SANDBOX=path/to/systemd-sandbox to override;
#                                             CHECK_MDWE=1 adds MemoryDenyWriteExecute=yes)
#
# The sandbox shares /etc, /opt, /usr, /var and /tmp with the host: what install-service.sh
# writes there, and the test user, are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SANDBOX=${SANDBOX:-$ROOT/../shared/tools/systemd-sandbox}
TUSER=kvmmcheck$$
MNT=/var/lib/kvmm/mnt
[ "$(id -u)" -eq 0 ] || { echo "check-service: needs root" >&2; exit 1; }
getent passwd kvmm >/dev/null && { echo "check-service: a kvmm user exists already; this check" \
  "installs and purges its own (run install-service.sh --uninstall --purge first)" >&2; exit 1; }

pid=""
cleanup() {
  set +e
  getent passwd "$TUSER" >/dev/null && userdel "$TUSER"
  if [ -n "$pid" ]; then
    "$SANDBOX" run "$pid" bash "$ROOT/scripts/install-service.sh" --uninstall --purge
    "$SANDBOX" down "$pid"
  else
    bash "$ROOT/scripts/install-service.sh" --uninstall --purge
  fi
  mountpoint -q "$MNT" 2>/dev/null && umount -l "$MNT"
}
trap cleanup EXIT
sb() { "$SANDBOX" run "$pid" "$@"; }
as_user() { sb runuser -u "$TUSER" -- env KVMM_SOCKET=/run/kvmm/kvmm.sock "$@"; }
step() { echo; echo "== $*"; }
fail() { echo "check-service: FAILED: $*" >&2; sb journalctl -b --no-pager -n 60 -u kvmm -u kvmm-view || true; exit 1; }

step "boot systemd in the sandbox"
pid=$("$SANDBOX" up)
sb systemctl is-system-running || true

step "install-service.sh (inside)"
t0=$(date +%s)
sb bash "$ROOT/scripts/install-service.sh"
echo "installed in $(( $(date +%s) - t0 )) s"
sb bash "$ROOT/scripts/install-service.sh" | tail -1          # idempotent: a second run is quick
# a short watchdog for this check only (/run is the sandbox's own)
sb mkdir -p /run/systemd/system/kvmm.service.d
# (CHECK_MDWE=1 also tries MemoryDenyWriteExecute=yes: does torch still serve?)
sb sh -c "printf '[Service]\nWatchdogSec=8\n%s\n' '$([ "${CHECK_MDWE:-0}" = 1 ] && echo MemoryDenyWriteExecute=yes)' \
  > /run/systemd/system/kvmm.service.d/check.conf"
sb systemctl daemon-reload

step "systemd-analyze security"
sb systemd-analyze security kvmm.service | tail -1
sb systemd-analyze security kvmm-view.service | tail -1

step "an ordinary user sb group kvmm"
useradd --no-create-home --shell /usr/sbin/nologin -G kvmm "$TUSER"
id "$TUSER"

step "start kvmm.socket; the first connection starts the daemon"
sb systemctl start kvmm.socket kvmm-http.socket
as_user kvmm generate --max-tokens 12 --session notes "The capital of France is" \
  || fail "generate as $TUSER"
sb systemctl is-active kvmm.service kvmm-view.service
sb systemctl status --no-pager kvmm.service | sed -n '1,12p'

step "the view, as $TUSER and as root"
sb findmnt -n -o TARGET,SOURCE,FSTYPE,OPTIONS "$MNT" || fail "the view is not mounted on the host side"
listing=$(as_user ls "$MNT/sessions")
echo "ls $MNT/sessions as $TUSER: $listing"
[[ $listing == *notes* ]] || fail "$TUSER does not see their session"
as_user head -c 200 "$MNT/sessions/$listing/meta.json"; echo
as_user kvmm stats | grep -E "sessions|swapfs view"
as_user kvmm stats | grep -q "swapfs view    mounted" || fail "kvmm stats does not show the view mounted"
nobody=$(sb runuser -u nobody -- ls "$MNT/sessions")
echo "ls $MNT/sessions as nobody: '${nobody}'"
[ -z "$nobody" ] || fail "another user sees $TUSER's session"

step "process of the engine: user, capabilities"
main=$(sb systemctl show -p MainPID --value kvmm.service)
sb grep -E "^(Uid|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):" "/proc/$main/status"
sb grep -E "Max locked memory|Max nice" "/proc/$main/limits"
sb journalctl --no-pager -b -u kvmm -o cat | grep -E "mlock|locked|io_uring|I/O threads|MemoryDeny|OpenMP" | head -6 || true
# the engine re-executes itself with LLVM's OpenMP runtime (setup installs it); under the
# unit's seccomp filter and sandboxing, with the PID systemd watches
as_user kvmm stats | grep openmp
sb grep -q libomp "/proc/$main/maps" || fail "the engine (pid $main) does not run LLVM's OpenMP runtime"
# LimitMEMLOCK=infinity and LimitNICE=-10 raise hard limits: systemd needs CAP_SYS_RESOURCE for
# that. Where the sandbox's PID 1 lacks it (a container that drops it), the limits stay at the
# host's and the pool runs unlocked (logged); elsewhere they must be in effect.
memlock=$(sb awk '/^Max locked memory/ {print $4}' "/proc/$main/limits")
pid1_caps=$(sb awk '/^CapEff:/ {print $2}' /proc/1/status)
if (( (16#$pid1_caps >> 24) & 1 )); then
  [ "$memlock" = unlimited ] || fail "LimitMEMLOCK=infinity is not in effect (hard limit $memlock)"
  echo "LimitMEMLOCK=infinity in effect"
else
  echo "the sandbox's PID 1 lacks CAP_SYS_RESOURCE (CapEff $pid1_caps): systemd cannot raise"
  echo "LimitMEMLOCK/LimitNICE above the host's hard limits (memlock $memlock bytes) on this machine"
fi

step "stop cleanly"
sb systemctl stop kvmm.service
sb systemctl show -p Result -p ExecMainStatus -p ActiveState kvmm.service
[ "$(sb systemctl show -p Result --value kvmm.service)" = success ] || fail "kvmm.service did not stop cleanly"
sleep 1
if sb mountpoint -q "$MNT"; then fail "the view stayed mounted after the daemon stopped"; fi
echo "view unmounted after stop"

step "the watchdog restarts a hung (SIGSTOPped) engine"
as_user kvmm generate --max-tokens 4 "Hello" >/dev/null || fail "generate after restart"
before=$(sb systemctl show -p MainPID --value kvmm.service)
n0=$(sb systemctl show -p NRestarts --value kvmm.service)
echo "MainPID $before, NRestarts $n0: kill -STOP"
sb kill -STOP "$before"
for _ in $(seq 60); do
  sleep 1
  after=$(sb systemctl show -p MainPID --value kvmm.service)
  state=$(sb systemctl is-active kvmm.service || true)
  if [ "$after" != "$before" ] && [ "$after" != 0 ] && [ "$state" = active ]; then break; fi
done
n1=$(sb systemctl show -p NRestarts --value kvmm.service)
echo "MainPID $after, NRestarts $n1, $state"
[ "$after" != "$before" ] && [ "$n1" -gt "$n0" ] && [ "$state" = active ] || fail "no watchdog restart"
sb journalctl --no-pager -b -u kvmm -o cat | grep -iE "watchdog" | head -3
as_user kvmm generate --max-tokens 4 "Hello again" || fail "generate after the watchdog restart"

step "single-line journal (no traceback folded into one line)"
if sb journalctl --no-pager -b -u kvmm -u kvmm-view -o cat | grep -F 'Traceback'; then
  fail "a traceback reached the journal"
fi
echo "no traceback lines"
sb systemctl stop kvmm.service kvmm.socket kvmm-http.socket kvmm-view.socket kvmm-view.service
echo; echo "check-service: OK"
