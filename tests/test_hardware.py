import json
from pathlib import Path

import pytest

from fiddlerc.errors import OptionError
from fiddlerc.hardware import load_profile, profile_from_json, profile_names


def test_shipped_profiles_load_and_round_trip():
    names = profile_names()
    assert {"quadro-rtx6000-skylake48", "l4-cascadelake32", "rtx4090-ddr5", "h100-server", "cpu-2core"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert profile_from_json(p.to_json()) == p
        numbers = [f"cpu.{k}" for k in ("mem_bw_gbps", "matmul_tflops")] + (
            [f"gpu.{k}" for k in ("memory_bytes", "mem_bw_gbps", "matmul_tflops", "h2d_gbps")] if p.gpu else []
        )
        assert all(p.sources.get(k) for k in numbers), f"{name}: every number needs a source"
    assert load_profile("cpu-2core").cpu_only and not load_profile("h100-server").cpu_only


def test_profile_from_a_file(tmp_path):
    f = tmp_path / "mine.json"
    data = json.loads(load_profile("rtx4090-ddr5").to_json())
    data["name"] = "mine"
    f.write_text(json.dumps(data))
    assert load_profile(f).name == "mine"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["cpu"].update(mem_bw_gbps=-1), "cpu.mem_bw_gbps"),
        (lambda d: d["gpu"].update(h2d_gbps="fast"), "gpu.h2d_gbps"),
        (lambda d: d["gpu"].pop("name"), "fields must be exactly"),
        (lambda d: d.update(extra=1), "expected the keys"),
        (lambda d: d.update(name="../../etc"), "name must be"),
        (lambda d: d["cpu"].update(cores=2.5), "cpu.cores"),
    ],
)
def test_malformed_profiles_are_clear_errors(edit, message):
    data = json.loads(load_profile("h100-server").to_json())
    edit(data)
    with pytest.raises(OptionError, match=message):
        profile_from_json(json.dumps(data))


def test_unknown_hardware_lists_the_names():
    with pytest.raises(OptionError, match="unknown hardware 'nope'.*h100-server"):
        load_profile("nope")
    with pytest.raises(OptionError, match="not valid JSON"):
        profile_from_json(b"{")


def test_cli_lists_one_profile_per_line_name_first(capsys):
    from fiddlerc.cli import main

    assert main(["plan", "--list-hardware"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == profile_names()


def test_cpu_features_name_the_vector_flags_and_cores_of_this_machine():
    from fiddlerc.hardware import cpu_features

    flags, cores = cpu_features().split(" / ")
    assert cores.endswith(" cores") and int(cores.split()[0]) >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and " avx2 " in cpuinfo.read_text():
        assert "avx2" in flags.split()
