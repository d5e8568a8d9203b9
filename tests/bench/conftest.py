"""Skip reasons of the bench tests: memory cgroups (root + a memory controller), llama_cpp."""
from __future__ import annotations

import importlib.util
import os

import pytest

from kvmm_daemon.bench.memory_cgroup import cgroup_version
from kvmm_daemon.errors import ConfigError


def cgroup_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"creating cgroups needs root (running as uid {os.geteuid()})"
    try:
        cgroup_version()
    except ConfigError as exc:
        return str(exc)
    return None


needs_cgroup = pytest.mark.skipif(cgroup_skip_reason() is not None, reason=cgroup_skip_reason() or "")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama_cpp is not importable (pip install '.[llama]')")
