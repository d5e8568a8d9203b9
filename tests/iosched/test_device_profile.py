import json
import os

import pytest

from iosched import DeviceError, DeviceProfile
from iosched.device_profile import DEPTHS, PROFILE_FILE, SIZES


def test_default():
    p = DeviceProfile.default()
    assert (p.queue_depth, p.request_bytes, p.read_bandwidth) == (8, 1 << 20, 0.0)


def test_validation_names_the_value():
    with pytest.raises(ValueError, match="4097"):
        DeviceProfile(queue_depth=1, request_bytes=4097, read_bandwidth=0.0, measured_on="x")


def test_measure_then_load_without_measuring_again(data_dir, monkeypatch, tmp_path):
    state = str(tmp_path / "state")
    p = DeviceProfile.load_or_measure(state, data_dir)
    assert p.queue_depth in DEPTHS and p.request_bytes in SIZES and p.read_bandwidth > 0
    assert os.listdir(data_dir) == []           # the scratch file is gone
    table = json.load(open(os.path.join(state, PROFILE_FILE)))
    assert str(os.stat(data_dir).st_dev) in table

    def no(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(DeviceProfile, "measure", classmethod(no))
    assert DeviceProfile.load_or_measure(state, data_dir) == p


def _tmpfs_dir():
    for line in open("/proc/mounts"):
        dev, mnt, fstype = line.split()[:3]
        if fstype == "tmpfs" and os.access(mnt, os.W_OK) and mnt in ("/dev/shm", "/run", "/tmp"):
            return mnt
    return None


@pytest.mark.skipif(_tmpfs_dir() is None, reason="no writable tmpfs mount (/dev/shm, /run)")
def test_no_o_direct_is_a_device_error_naming_the_fix():
    try:
        DeviceProfile.measure(_tmpfs_dir(), seconds=0.1)
    except DeviceError as e:
        assert "O_DIRECT" in str(e) and "ext4" in str(e)
    else:
        pytest.skip("this kernel's tmpfs accepts O_DIRECT (Linux >= 6.6 does)")
