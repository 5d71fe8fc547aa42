"""Device mapping and memory checks at load time."""

import logging
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

import fiddlerc
from fiddlerc.errors import OptionError
from fiddlerc.loader import devices
from fiddlerc.loader.devices import check_host_memory, device_map, resolve_device
from tests.test_plan_file import small_plan


def test_unavailable_device(model_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    with pytest.raises(OptionError, match="not available"):
        fiddlerc.load(tmp_path / "out", device="cuda:0")


def test_device_names_resolve_or_say_what_to_write(caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, message in [("tpu", "unknown device 'tpu'"), ("meta", "unsupported device 'meta'")]:
        with pytest.raises(OptionError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="fiddlerc.loader.devices"):
            assert resolve_device(None) == torch.device("cpu")  # no GPU: the fast tier runs on the CPU, said aloud
        assert "no CUDA device" in caplog.text


def test_every_device_of_a_plan_maps_to_one_of_this_machine():
    p = small_plan()
    p = p.with_(target=replace(p.target, more_gpus=("cuda:1",)))
    on_cpu = device_map(p, torch.device("cpu"))  # a CPU-only load runs every tier on the CPU
    assert on_cpu == {"cpu": torch.device("cpu"), "cuda:0": torch.device("cpu"), "cuda:1": torch.device("cpu")}
    if torch.cuda.device_count() < 2:
        with pytest.raises(OptionError, match="places experts on cuda:1.*recompile for this machine's GPUs"):
            device_map(p, torch.device("cuda", 0))


def test_host_memory_check_counts_what_the_run_reads_from_host_memory(monkeypatch, caplog):
    p = small_plan()  # 1000 B budget: 500 dense, 100 KV, 200 B of experts on each tier
    monkeypatch.setattr(devices, "available_host_memory", lambda: 700)
    with caplog.at_level(logging.WARNING, logger="fiddlerc.loader.devices"):
        check_host_memory(p, torch.device("cuda", 0))  # only the CPU tier's 200 B live in host memory
        assert not caplog.text
        check_host_memory(p, torch.device("cpu"))  # everything: 500 + 100 + 400 B > 700 B
    assert "reads 1000 B of weights from host memory but only 700 B" in caplog.text


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads Linux's /proc/meminfo")
def test_available_host_memory_is_read_from_the_kernel():
    free = devices.available_host_memory()
    assert free is not None and 0 < free <= psutil.virtual_memory().total


def test_loading_warns_when_host_memory_is_short(model_dirs, tmp_path, monkeypatch, caplog):
    import logging

    import fiddlerc
    from fiddlerc.loader import devices as loader

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    monkeypatch.setattr(loader, "available_host_memory", lambda: 1000)
    with caplog.at_level(logging.WARNING, logger="fiddlerc.loader.devices"):
        fiddlerc.load(tmp_path / "out", device="cpu").close()
    assert "will page from disk" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loader, "available_host_memory", lambda: 2**40)
    with caplog.at_level(logging.WARNING, logger="fiddlerc.loader.devices"):
        fiddlerc.load(tmp_path / "out", device="cpu").close()
    assert "page from disk" not in caplog.text
