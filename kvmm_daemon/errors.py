"""Typed errors of kvmm.

`KvmmError` and its subclasses are caller mistakes or environment problems that a user can
fix; their message is one line naming the culprit and the fix, and the CLI prints it without
a traceback (exit status 2). Internal invariants use `assert` instead.
"""


class KvmmError(Exception):
    """A user-facing error: one line, names the problem and the fix."""


class ModelLoadError(KvmmError):
    """The model file is missing, unreadable, or of an unsupported type/architecture."""


class ConfigError(KvmmError):
    """A configuration value is invalid; the message names the key and the fix."""


class RequestError(KvmmError):
    """A request can never be served as asked (too long, bad sampling parameters...)."""


class CapacityError(RequestError):
    """The KV budget can never hold the request, even with every other request preempted."""


class WeightFileError(KvmmError):
    """A prepared weight file is missing, stale, truncated or corrupt (it can be rebuilt)."""


class WeightReadError(KvmmError):
    """Weights could not be read from flash (after retries): the step's requests fail."""
