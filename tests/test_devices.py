"""Choosing a device, its dtype, and how many layers fit its memory (devices.py, placement.auto_width),
and what every command says when the device asked for is not there."""

from __future__ import annotations

import re
import signal
import sys

import pytest
import torch
from click.testing import CliRunner

from dsdnode.cli import main
from dsdnode.config import ConfigError, NodeSettings, load_settings
from dsdnode.devices import DeviceError, check_device_spec, default_dtype, resolve_device, resolve_dtype
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config
from dsdnode.ready import parse_ready
from dsdnode.server.memory import CPU_SAFETY, MB, RESERVE_BYTES, available_memory_bytes, layer_bytes
from dsdnode.server.placement import auto_width
from tests.helpers.devices import CUDA, needs_gpu
from tests.helpers.tiny_models import tiny_config

CPU = torch.device("cpu")
only_without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
NO_CUDA = f"--device cuda: no CUDA device is available (torch {torch.__version__} is a CPU build)"


def test_device_names_are_checked_before_anything_exists():
    for spec in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert check_device_spec(spec) == spec
    for spec in ("gpu", "cuda:", "cuda:x", "CPU ", "tpu", ""):
        with pytest.raises(DeviceError, match=re.escape(f"--device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")):
            check_device_spec(spec)


@only_without_gpu
def test_auto_is_the_cpu_here_and_its_dtype_is_bfloat16():
    if torch.backends.mps.is_available():
        pytest.skip("auto picks MPS on this machine")
    assert resolve_device("auto") == resolve_device("cpu") == CPU
    assert default_dtype(CPU) == resolve_dtype(None, CPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == torch.float32 and resolve_dtype("float16", CPU) == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float64", CPU)


@only_without_gpu
def test_a_missing_cuda_device_is_one_clear_error():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the message names the driver instead")
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda")
    assert str(e.value) == NO_CUDA
    with pytest.raises(DeviceError, match=re.escape("--device cuda:1: no CUDA device is available")):
        resolve_device("cuda:1")


def test_a_missing_mps_device_is_one_clear_error():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError, match="--device mps: MPS is not available"):
        resolve_device("mps")


@needs_gpu
@pytest.mark.gpu
def test_cuda_resolves_and_an_index_past_the_last_gpu_is_refused():
    assert resolve_device("cuda").type == "cuda" and resolve_device("auto").type == "cuda"
    assert default_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"this machine has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


# ---- memory -----------------------------------------------------------------------------------
def test_available_memory_is_memavailable_of_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:          100000 kB\nMemAvailable:   12345678 kB\n")
    assert available_memory_bytes(CPU, meminfo) == 12345678 * 1024
    meminfo.write_text("MemTotal:       32000000 kB\n")
    with pytest.raises(DeviceError, match="no MemAvailable line.*--num-layers"):
        available_memory_bytes(CPU, meminfo)
    with pytest.raises(DeviceError, match="cannot read"):
        available_memory_bytes(CPU, tmp_path / "missing")
    assert available_memory_bytes(CPU) > 0  # this machine's own


def test_layer_bytes_from_the_config_equal_the_loaded_weights(tiny_model_dir):
    """Computed from the config alone, the size of a layer is what loading it really costs."""
    config = load_config(tiny_model_dir)
    span = Span.load(tiny_model_dir, 0, config.num_hidden_layers, dtype=torch.float32)
    loaded = sum(p.numel() * p.element_size() for p in span.layers.parameters()) // config.num_hidden_layers
    assert layer_bytes(config, torch.float32) == loaded == 2 * layer_bytes(config, torch.bfloat16)


def test_auto_width_takes_what_fits_after_the_cache_budget():
    config = tiny_config("qwen2", num_hidden_layers=40)
    per_layer = layer_bytes(config, torch.float32)
    fit = dict(config=config, device=CPU, dtype=torch.float32, num_layers=0, cache_budget_mb=1)

    # 3.5 layers of room after the safety margin, the reserve and the 1 MB cache budget: 3 layers
    available = int((3.5 * per_layer + 1 * MB + RESERVE_BYTES) / CPU_SAFETY)
    assert auto_width(**fit, available_bytes=available) == 3
    # a bigger cache budget leaves room for fewer layers
    assert auto_width(**{**fit, "cache_budget_mb": 2}, available_bytes=available + MB) < 3
    # plenty of memory: the whole model, no more
    assert auto_width(**fit, available_bytes=1 << 40) == 40
    # --max-memory caps weights + cache together: 2 MB - 1 MB of cache
    assert auto_width(**fit, max_memory_mb=2, available_bytes=1 << 40) == MB // per_layer
    assert 1 < MB // per_layer < 40
    # --num-layers wins (no memory is consulted)
    assert auto_width(**{**fit, "num_layers": 5}, available_bytes=0) == 5
    assert auto_width(**{**fit, "num_layers": 99}, available_bytes=0) == 40


def test_not_even_one_layer_is_a_clear_error():
    config = tiny_config("llama", num_hidden_layers=8)
    with pytest.raises(DeviceError, match=r"--layers auto: not one layer \(.* MB\) fits cpu: .*--cache-budget-mb 64.*"
                                          r"give --num-layers"):
        auto_width(config, CPU, torch.bfloat16, num_layers=0, cache_budget_mb=64, available_bytes=300 * MB)
    with pytest.raises(DeviceError, match="capped by --max-memory 1"):
        auto_width(config, CPU, torch.bfloat16, num_layers=0, cache_budget_mb=1, max_memory_mb=1,
                   available_bytes=1 << 40)


# ---- settings and commands ----------------------------------------------------------------------
def test_device_in_the_node_config_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[node]\ndevice = 'cuda:1'\nmax_memory_mb = 4096\n")
    s = load_settings(NodeSettings, path)
    assert (s.device, s.max_memory_mb, s.dtype) == ("cuda:1", 4096, None)
    assert load_settings(NodeSettings, path, device="cpu").device == "cpu"  # the flag wins
    path.write_text("[node]\ndevice = 'gpu'\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'")):
        load_settings(NodeSettings, path)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("args", [
    ["start", "--device", "gpu"],
    ["generate", "hi", "--local", "--device", "cuda:x"],
    ["api", "--local", "--device", "tpu"],
    ["bench", "--quick", "--device", "GPU0"],
    ["demo", "--device", "cuda1"],
], ids=lambda args: " ".join(args))
def test_misspelt_devices_are_usage_errors(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and "Invalid value for '--device'" in errors[0], result.output


@only_without_gpu
@pytest.mark.parametrize("args", [
    ["start", "--layers", "0:1", "--device", "cuda"],
    ["generate", "hi", "--local", "--device", "cuda"],
    ["api", "--local", "--device", "cuda"],
    ["demo", "--device", "cuda"],
    ["bench", "--quick", "--device", "cuda"],
], ids=lambda args: " ".join(args))
def test_a_missing_gpu_is_one_line_from_every_command(args):
    """Before any weights are read or any peer is started."""
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the message names the driver instead")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert error_lines(result.output) == [f"Error: {NO_CUDA}"], result.output


@pytest.mark.heavy
def test_a_real_server_sizes_its_span_to_max_memory_and_says_its_device(smollm2_dir, tmp_path):
    """`dsdnode start --layers auto --max-memory 50 --cache-budget-mb 1` in float32 on the CPU takes
    exactly the layers that 49 MB hold, and its ready line names the device."""
    from dsdnode.local_swarm import start_node

    per_layer = layer_bytes(load_config(smollm2_dir), torch.float32)
    expected = (50 - 1) * MB // per_layer
    assert 1 < expected < 30
    node = start_node(["--model", "smollm2-135m", "--layers", "auto", "--max-memory", "50", "--cache-budget-mb", "1",
                       "--dtype", "float32", "--device", "cpu"], tmp_path / "server.log",
                      launcher=[sys.executable, "-m", "dsdnode", "-v"])
    try:
        assert node.info["device"] == "cpu"
        assert (node.info["start"], node.info["end"]) == (0, expected)
    finally:
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(30)
    log = (tmp_path / "server.log").read_text()
    assert f"--layers auto: {expected} of 30 layers" in log and "on cpu in float32" in log
    assert parse_ready(node.lines[0]) is not None


@pytest.mark.heavy
@pytest.mark.parametrize("device", [CUDA])
def test_a_real_server_on_the_gpu(smollm2_dir, tmp_path, device):
    from dsdnode.local_swarm import start_node

    node = start_node(["--model", "smollm2-135m", "--layers", "auto", "--device", device], tmp_path / "server.log")
    try:
        assert node.info["device"] == "cuda" and node.info["end"] == 30  # 135M fits any GPU whole
    finally:
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(30)
