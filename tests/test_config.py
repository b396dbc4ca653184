import pytest

from dsdnode.config import ConfigError, NodeSettings, load_settings, read_peers_file

ID = "12D3KooWExampleExampleExampleExampleExampleExample1"


def test_example_config_loads_and_flags_override(tmp_path):
    s = load_settings(NodeSettings, "configs/node.example.toml", port=4000, bootstrap=("/ip4/1.2.3.4/tcp/1/p2p/x",))
    assert s.layers == "auto" and s.port == 4000 and s.bootstrap == ["/ip4/1.2.3.4/tcp/1/p2p/x"]
    assert s.cache_budget_mb == 2048 and s.session_idle_s == 300.0


@pytest.mark.parametrize("text, error", [
    ("[node\n", "not valid TOML"),
    ("[node]\nprot = 1\n", "unknown key 'prot'"),
    ("[node]\nport = 'eighty'\n", "port must be int"),
    ("[node]\nbootstrap = [1, 2]\n", "bootstrap must be a list of strings"),
    ("[node]\nthreads = true\n", "threads must be int"),
    ("[node]\nthreads = -1\n", "threads must be >= 0, got -1"),
    ("[node]\nport = 70000\n", r"port must be in \[0, 65535\], got 70000"),
    ("[node]\nmetrics_port = -1\n", r"metrics_port must be in \[0, 65535\], got -1"),
    ("[node]\nlink_latency_ms = -100\n", "link_latency_ms must be >= 0, got -100.0"),
    ("[node]\nlink_latency_ms = nan\n", "link_latency_ms must be >= 0, got nan"),
    ("[node]\ncache_budget_mb = 0\n", "cache_budget_mb must be >= 1, got 0"),
    ("[node]\nmax_session_length = 0\n", "max_session_length must be >= 1, got 0"),
    ("[node]\nmax_block = 0\n", "max_block must be >= 1, got 0"),
    ("[node]\nannounce_interval_s = 0\n", "announce_interval_s must be > 0, got 0.0"),
    ("[node]\nsession_idle_s = -1\n", "session_idle_s must be > 0, got -1.0"),
    ("[node]\nrecord_ttl_s = inf\n", "record_ttl_s must be > 0, got inf"),
    ("[node]\ndtype = 'float64'\n", "dtype must be one of bfloat16, float16, float32, got 'float64'"),
])
def test_bad_config_files_name_file_and_key(tmp_path, text, error):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error) as e:
        load_settings(NodeSettings, path)
    assert str(path) in str(e.value)


def test_relay_limits_come_from_the_relay_keys(tmp_path):
    from dsdnode.net.relay import RelayLimits
    from dsdnode.server.node import relay_limits

    assert relay_limits(load_settings(NodeSettings, "configs/node.example.toml")) == RelayLimits()  # the same defaults
    path = tmp_path / "relay.toml"
    path.write_text("[node]\nrelay_max_reservations_per_network = 1\nrelay_circuit_mb_per_s = 0.5\n"
                    "relay_circuit_idle_s = 2\nrelay_circuit_mb = 8\n")
    limits = relay_limits(load_settings(NodeSettings, path))
    assert (limits.max_reservations_per_group, limits.circuit_bytes_per_s, limits.circuit_idle_s,
            limits.circuit_bytes) == (1, 1 << 19, 2.0, 8 << 20)
    assert limits.max_circuits == RelayLimits().max_circuits
    path.write_text("[node]\nrelay_circuit_mb_per_s = 0\n")
    with pytest.raises(ConfigError, match="relay_circuit_mb_per_s must be > 0"):
        load_settings(NodeSettings, path)


def test_flags_get_the_same_checks():
    with pytest.raises(ConfigError, match="^settings: port must be in"):
        load_settings(NodeSettings, port=-1)
    with pytest.raises(ConfigError, match="^settings: link_latency_ms must be >= 0"):
        load_settings(NodeSettings, link_latency_ms=-1.0)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(NodeSettings, "/nonexistent/node.toml")


def test_peers_file(tmp_path):
    path = tmp_path / "peers.txt"
    path.write_text(f"# comment\n\n/ip4/10.0.0.1/tcp/1/p2p/{ID}  # trailing\n/dns4/a.example/tcp/2/p2p/{ID}\n")
    assert read_peers_file(path) == [f"/ip4/10.0.0.1/tcp/1/p2p/{ID}", f"/dns4/a.example/tcp/2/p2p/{ID}"]
    path.write_text("10.0.0.1:31337\n")
    with pytest.raises(ConfigError, match="not a multiaddr"):
        read_peers_file(path)
    assert read_peers_file("peers/example.txt")
