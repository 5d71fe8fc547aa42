"""calibrate, popularity, bench from the command line."""

import json

from fiddlerc.cli import main


def test_calibrate_then_compile_with_auto(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["calibrate", str(tiny_with_tokenizer), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "calibrated-" in out and "roofline fit error" in out
    assert (
        main(
            [
                "compile",
                str(tiny_with_tokenizer),
                "-o",
                str(tmp_path / "out"),
                "--gpu-memory",
                "1MiB",
                "--context",
                "64",
                "--hardware",
                "auto",
            ]
        )
        == 0
    )
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["target"]["hardware"].startswith("calibrated-") and plan["prediction"]["decode_ms_per_token"] > 0


def test_popularity_is_also_spelt_profile_as_in_the_fiddler_paper():
    from fiddlerc.cli import build_parser

    for spelling in ("popularity", "profile"):
        args = build_parser().parse_args([spelling, "model", "--data", "d.txt", "-o", "pop.json"])
        assert args.func.__name__ == "_cmd_popularity" and (args.model_dir, args.out) == ("model", "pop.json")
