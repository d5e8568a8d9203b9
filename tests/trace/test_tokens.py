from kvmm_daemon.trace.tokens import TokenSource, token_delta


def test_token_delta():
    assert token_delta(10, 25) == 15
    assert token_delta(None, 25) is None and token_delta(10, None) is None
    assert token_delta(30, 5) is None   # the daemon restarted


def test_unreachable_daemon_is_said_once(tmp_path):
    src = TokenSource(str(tmp_path / "no.sock"))
    assert src.read() is None
    assert src.error.startswith("daemon stats unreachable (cannot connect to the kvmm daemon at")
    assert src.error.endswith("per-token figures omitted")
    first = src.error
    assert src.read() is None and src.error == first
