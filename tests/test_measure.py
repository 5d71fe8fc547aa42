"""The timer and the measure-and-cache helper every measurement uses."""

import json

from fiddlerc import measure


def test_seconds_times_each_round_after_the_warmup():
    calls = []
    times = measure.seconds(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_cached_measures_once_and_again_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = measure.cache_path("kind", [1, "x"])
    assert path.parent == tmp_path / "fiddlerc" / "calibration"
    assert measure.cache_path("kind", [2, "x"]) != path  # the key names the file
    runs = []

    def once() -> str:
        runs.append(1)
        return json.dumps({"ms": len(runs)})

    assert measure.cached(path, once, json.loads) == {"ms": 1}
    assert measure.cached(path, once, json.loads) == {"ms": 1} and len(runs) == 1  # from the cache
    path.write_text("{damaged")
    assert measure.cached(path, once, json.loads) == {"ms": 2}  # measured again
    assert measure.cached(path, once, json.loads, use_cache=False) == {"ms": 3}


def test_pool_is_larger_than_the_caches():
    assert measure.pool_size(2**20) * 2**20 >= measure.POOL_BYTES
    assert measure.pool_size(2**40) == 4  # never fewer than a few items


def test_machines_that_share_a_cpu_model_and_host_name_but_not_its_kernels_get_their_own_cache(monkeypatch):
    monkeypatch.setattr(measure, "cpu_features", lambda: "avx2 fma f16c / 2 cores")
    avx2 = measure.cache_path("kind", [1])
    monkeypatch.setattr(measure, "cpu_features", lambda: "avx2 fma f16c avx512f avx512_bf16 / 2 cores")
    assert measure.cache_path("kind", [1]) != avx2
