"""DaemonConfig: precedence of file < environment < flags, and errors that name key and fix."""
import pytest

from kvmm_daemon.daemon.daemon_config import DaemonConfig
from kvmm_daemon.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "kvmm.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    cfg = DaemonConfig.load(env={})
    assert cfg.socket == "/run/kvmm/kvmm.sock" and cfg.socket_mode == 0o660 and cfg.grace_period_s == 30.0
    assert cfg.engine.kv_budget == 256 << 20


def test_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, '[daemon]\nsocket = "/tmp/a.sock"\ngrace_period_s = 5\nmax_clients = 3\n'
                           '[engine]\nkv_budget = "64MiB"\nblock_size = 32\n')
    cfg = DaemonConfig.load(path, env={})
    assert (cfg.socket, cfg.grace_period_s, cfg.max_clients) == ("/tmp/a.sock", 5.0, 3)
    assert cfg.engine.kv_budget == 64 << 20 and cfg.engine.block_size == 32
    env = {"KVMM_SOCKET": "/tmp/b.sock", "KVMM_KV_BUDGET": "32M", "KVMM_MAX_CLIENTS": "7",
           "KVMM_SOCKET_MODE": "0600", "KVMM_SOCKET_GROUP": "1000", "KVMM_WEIGHT_BUDGET": "none"}
    cfg = DaemonConfig.load(path, env=env)
    assert (cfg.socket, cfg.max_clients, cfg.socket_mode, cfg.socket_group) == ("/tmp/b.sock", 7, 0o600, "1000")
    assert cfg.engine.kv_budget == 32 << 20 and cfg.engine.weight_budget is None
    cfg = DaemonConfig.load(path, env=env, flags={"socket": "/tmp/c.sock", "kv_budget": "16MiB", "model": None})
    assert cfg.socket == "/tmp/c.sock" and cfg.engine.kv_budget == 16 << 20


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, '[daemon]\nlog_level = "debug"\n')
    assert DaemonConfig.load(env={"KVMM_CONFIG": path}).log_level == "debug"


@pytest.mark.parametrize("text,needles", [
    ('[daemon]\nsockett = "/x"\n', ["unknown key 'sockett'", "[daemon]", "known keys"]),
    ('[deamon]\nsocket = "/x"\n', ["unknown top-level key 'deamon'", "[daemon] and [engine]"]),
    ('[engine]\nkv_budgett = 1\n', ["unknown key 'kv_budgett'", "[engine]"]),
    ('[daemon]\nsocket = "relative.sock"\n', ["daemon.socket", "absolute path", "kvmm.toml [daemon] socket"]),
    ('[daemon]\ngrace_period_s = -1\n', ["daemon.grace_period_s", "non-negative"]),
    ('[daemon]\nmax_clients = 0\n', ["daemon.max_clients", "positive"]),
    ('[daemon]\nlog_level = "loud"\n', ["daemon.log_level", "debug, info"]),
    ('[daemon]\nmax_frame_bytes = "12"\n', ["daemon.max_frame_bytes", "4096"]),
    ('[daemon]\nsocket_mode = 4095\n', ["daemon.socket_mode", "0o660"]),
    ('[engine]\nkv_budget = "lots"\n', ["--kv-budget", "256MiB", "kvmm.toml [engine] kv_budget"]),
    ('[engine]\nblock_size = 0\n', ["block_size"]),
    ("[daemon\n", ["not valid TOML"]),
])
def test_errors_name_key_source_and_fix(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(path, env={})
    for needle in needles:
        assert needle in str(e.value)


def test_other_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        DaemonConfig.load(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(ConfigError, match="KVMM_SOCKET_MODE"):
        DaemonConfig.load(env={"KVMM_SOCKET_MODE": "rw"})
    with pytest.raises(ConfigError, match="KVMM_GRACE_PERIOD_S"):
        DaemonConfig.load(env={"KVMM_GRACE_PERIOD_S": "-3"})
    with pytest.raises(ConfigError, match="--no-such-key is not supported"):
        DaemonConfig.load(env={}, flags={"no_such_key": "/x"})
    with pytest.raises(ConfigError, match="107 bytes"):
        DaemonConfig(socket="/" + "x" * 120)


def test_socket_group_resolution():
    assert DaemonConfig(socket_group="root").socket_gid() == 0
    assert DaemonConfig(socket_group="").socket_gid() is None
    with pytest.raises(ConfigError, match="socket_group 'no-such-group-kvmm' does not exist"):
        DaemonConfig(socket_group="no-such-group-kvmm").socket_gid()
