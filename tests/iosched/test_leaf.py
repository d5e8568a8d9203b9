import os
import subprocess
import sys


def test_iosched_is_a_leaf():
    """iosched imports nothing of kvmm_daemon, swapfs, kernels, or torch."""
    code = ("import sys, iosched, iosched.scheduler, iosched.device_profile, iosched.uring_backend;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('kvmm_daemon', 'swapfs', 'kernels', 'torch'));"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == ""
