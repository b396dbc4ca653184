import pytest

from dsdnode.config import ClientSettings, ConfigError, NodeSettings, load_settings, read_peers_file

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
])
def test_bad_config_files_name_file_and_key(tmp_path, text, error):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error) as e:
        load_settings(NodeSettings, path)
    assert str(path) in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ClientSettings, "/nonexistent/client.toml")


def test_peers_file(tmp_path):
    path = tmp_path / "peers.txt"
    path.write_text(f"# comment\n\n/ip4/10.0.0.1/tcp/1/p2p/{ID}  # trailing\n/dns4/a.example/tcp/2/p2p/{ID}\n")
    assert read_peers_file(path) == [f"/ip4/10.0.0.1/tcp/1/p2p/{ID}", f"/dns4/a.example/tcp/2/p2p/{ID}"]
    path.write_text("10.0.0.1:31337\n")
    with pytest.raises(ConfigError, match="not a multiaddr"):
        read_peers_file(path)
    assert read_peers_file("peers/example.txt")
