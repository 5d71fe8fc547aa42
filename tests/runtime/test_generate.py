"""Generation beyond greedy: sampling, EOS, dtypes, and the CPU worker's failure path."""

import threading

import pytest
import torch

import fiddlerc
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def model(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    fiddlerc.compile(model_dirs("mixtral"), out, gpu_memory="1GiB", context=64, fast_experts=4)
    m = fiddlerc.load(out, device="cpu")
    yield m
    m.close()


def _ids(batch=1, length=8, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_sampling_is_reproducible_with_a_seed(model):
    ids = _ids()
    a = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, seed=7, ignore_eos=True)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, seed=7, ignore_eos=True)
    c = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, seed=8, ignore_eos=True)
    greedy = model.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)


def test_tiny_top_p_and_zero_temperature_are_greedy(model):
    ids = _ids(seed=3)
    greedy = model.generate(ids, max_new_tokens=10, ignore_eos=True)
    assert torch.equal(
        model.generate(ids, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=1, ignore_eos=True), greedy
    )
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0, ignore_eos=True), greedy)


def test_stops_at_eos_and_pads_finished_rows(model):
    ids = _ids(batch=2, seed=4)
    free = model.generate(ids, max_new_tokens=10, ignore_eos=True)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 emits this as its third new token
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos)
    row0 = out[0, ids.shape[1] :].tolist()
    first = row0.index(eos)
    assert first <= 2
    assert all(t == model.pad_token_id for t in row0[first + 1 :])
    if eos not in free[1, ids.shape[1] :].tolist():  # the other row runs to the end
        assert out.shape[1] == ids.shape[1] + 10
        assert torch.equal(out[1], free[1])


def test_bfloat16_compile_matches_hugging_face_bfloat16(model_dirs, hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = model_dirs("qwen2_moe")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=3, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ref32 = hf_model(src)
    ids = _ids(batch=2, length=10)
    with fiddlerc.load(tmp_path / "out", device="cpu") as m, torch.no_grad():
        got = m(ids)
        assert got.dtype == torch.bfloat16
        want = ref(input_ids=ids).logits
        exact = ref32(input_ids=ids).logits
    # teacher-forced logits within bf16 rounding of HF's bf16 model, and both near fp32
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)
    assert (got.float() - exact).abs().max() < 0.1


def test_worker_runs_jobs_in_order_and_refuses_work_once_closed():
    from fiddlerc.runtime.worker import CpuWorker

    worker = CpuWorker(1)
    order = []
    jobs = [worker.submit(lambda i=i: order.append(i) or i * i) for i in range(6)]
    assert [j.result() for j in jobs] == [0, 1, 4, 9, 16, 25] and order == list(range(6))
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(print)


def test_worker_exception_reaches_the_caller(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0)
    before = set(threading.enumerate())
    m = fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference")  # plain tensors, on the worker thread
    placed = m.hf_model.model.layers[0].mlp.experts
    good = placed.weights[1].w_out
    for w in placed.weights:  # every expert is on the CPU worker; break them all
        w.w_out = w.w_out[:, :-1]
    with pytest.raises(RuntimeError) as info:
        m(_ids())
    assert "mat" in str(info.value) or "shape" in str(info.value)
    assert any("run_cpu" in str(tb.name) for tb in info.traceback)  # the worker's frames travel with it
    assert good.shape[1] == placed.weights[1].w_out.shape[1] + 1
    m.close()
    assert set(threading.enumerate()) <= before  # the worker thread is gone


def test_load_without_cuda_warns_and_runs_on_cpu(model_dirs, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    with caplog.at_level("WARNING"), fiddlerc.load(tmp_path / "out") as m:
        assert m.device.type == "cpu"
        assert m.plan.target.device == "cuda:0"  # the plan keeps its target
    assert "no CUDA device" in caplog.text


@pytest.mark.parametrize("num_beams,batch", [(2, 1), (3, 2), (4, 1)])
def test_beam_search_equals_hugging_face(model_dirs, hf_model, num_beams, batch, tmp_path):
    """Token for token against HF generate(num_beams=...), with EOS disabled (runs to the length limit)."""
    from tests.conftest import hf_greedy

    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    ids = _ids(batch=batch, length=6, seed=0)  # a prompt whose beams and greedy path differ
    ref = hf_model(src)
    with fiddlerc.load(tmp_path / "out", device="cpu") as m:
        ours = m.generate(ids, max_new_tokens=7, num_beams=num_beams, ignore_eos=True)
    with torch.no_grad():
        config = ref.generation_config
        old = (config.num_beams,)
        config.num_beams = num_beams
        try:
            theirs = hf_greedy(ref, ids, torch.ones_like(ids), 7)
        finally:
            (config.num_beams,) = old
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, hf_greedy(ref, ids, torch.ones_like(ids), 7))  # and not what greedy makes


def test_beam_search_with_an_eos_that_is_reached_equals_hugging_face(model_dirs, hf_model, tmp_path):
    """Finished hypotheses, length penalty and early stop: make a token the beams produce the EOS."""
    import copy

    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    ids = _ids(batch=2, length=5, seed=11)
    ref = hf_model(src)

    def hf(eos, **kw):
        config = copy.deepcopy(ref.generation_config)
        config.eos_token_id, config.pad_token_id, config.do_sample, config.num_beams = eos, 0, False, 3
        for k, v in kw.items():
            setattr(config, k, v)
        with torch.no_grad():
            return ref.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=8
            )

    free = hf(10**9)
    eos = int(free[0, 5 + 2])  # the third token the best beam of the first prompt makes
    outs = []
    with fiddlerc.load(tmp_path / "out", device="cpu") as m:
        for kw in ({}, {"length_penalty": 0.0}, {"length_penalty": -1.0}, {"early_stopping": True}):
            theirs = hf(eos, **kw)
            ours = m.generate(ids, max_new_tokens=8, num_beams=3, eos_token_id=eos, **kw)
            assert torch.equal(ours, theirs), kw
            outs.append(ours)
    assert any(o.shape != free.shape or not torch.equal(o, free) for o in outs)  # the EOS changed the search


def test_beam_search_refuses_sampling(model):
    with pytest.raises(fiddlerc.errors.OptionError, match="beam search"):
        model.generate(_ids(), max_new_tokens=3, num_beams=2, do_sample=True)


def test_beam_search_on_a_left_padded_batch_equals_hugging_face(model, model_dirs, hf_model):
    import copy

    ref = hf_model(model_dirs("mixtral"))
    ids = _ids(batch=2, length=6, seed=0)
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0
    config = copy.deepcopy(ref.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample, config.num_beams = 10**9, 0, False, 3
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=8)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, num_beams=3, ignore_eos=True), theirs)
