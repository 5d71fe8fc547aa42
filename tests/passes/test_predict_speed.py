"""predict_speed: the plan records its hardware profile and the cost model's prediction."""

import pytest

from fiddlerc.compiler.cost import predict_decode


def test_compile_records_the_profile_and_its_prediction(model_dirs, tmp_path):
    import json

    import fiddlerc
    from fiddlerc.compiler.report import report_text
    from fiddlerc.hardware import load_profile

    art = fiddlerc.compile(
        model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4, hardware="h100-server"
    )
    profile = load_profile("h100-server")
    assert (art.plan.target.hardware, art.plan.target.hardware_sha256) == (profile.name, profile.sha256())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["hardware"] == {"name": "h100-server", "sha256": profile.sha256()}
    want = predict_decode(art.plan, profile, 32)
    assert art.plan.prediction.decode_ms_per_token == pytest.approx(want.ms_per_token, abs=1e-4)
    assert "predicted decode on h100-server" in report_text(art.plan)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:  # a priced plan loads like any other
        assert model.plan == art.plan
