"""The daemon on the embedded model with its weights mostly on flash (a 22 MiB pool)."""
import json
import shutil
import subprocess
import tempfile

import pytest

from kvmm_daemon.client import Client
from tests.daemon.conftest import KVMM, DaemonProcess

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture
def state_dir():
    d = tempfile.mkdtemp(prefix="kvmm-state-", dir="/var/tmp")    # O_DIRECT needs a disk fs
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_daemon_streams_weights_under_a_22mib_budget(state_dir):
    want = json.loads(subprocess.run(
        [KVMM, "run", "--raw", "--max-tokens", "12", "--ignore-eos", "--threads", "1", "--json", PROMPT],
        capture_output=True, text=True, check=True).stdout)["token_ids"]
    d = DaemonProcess(None, embedded=True, kv_budget="16MiB",
                      args=["--socket-group", "", "--weight-budget", "22MiB", "--state-dir", state_dir,
                            "--max-model-len", "256"])
    try:
        with Client(d.socket) as c:
            got = c.generate(prompt=PROMPT, raw=True, max_tokens=12, ignore_eos=True)
            stats = c.stats()
        assert got.token_ids == want                 # the same tokens as all-resident
        weights = stats["weights"]
        assert weights["streaming"] and weights["budget_bytes"] == 22 << 20
        assert weights["resident_bytes"] <= 22 << 20 and weights["bytes_read"] > 0
        memory = stats["memory"]
        assert memory["weights"] + memory["weight_buffers"] <= 22 << 20
        assert memory["rss"] == memory["weights"] + memory["weight_buffers"] + memory["kv"] + memory["rest"]
        assert d.stop() == 0
        assert "preparing the weight file" in d.log() and "Traceback" not in d.log()
    finally:
        d.cleanup()
