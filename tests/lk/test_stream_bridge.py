"""lk's CUDA stream bridge (csrc/lk/cuda) against a fake driver library.

tests/fake_cuda_driver.c records the bridge's driver calls instead of running them; playing
the recording back is what a stream (or a captured graph's replay) does on a GPU. "Device"
memory is host memory here, so every step is checked against lk's own synchronous forward.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lvllm import _lk
from lvllm.lk import MoEEngine, make_runtime

E, H, I, K = 6, 40, 48, 2


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build the fake CUDA driver"
    library = tmp_path_factory.mktemp("fake_cuda") / "libfakecuda.so"
    source = Path(__file__).with_name("fake_cuda_driver.c")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(library),
                    str(source)], check=True)
    control = ctypes.CDLL(str(library))
    control.fake_recorded.restype = ctypes.c_int
    return str(library), control


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    return MoEEngine(w13, w2, "silu", runtime=make_runtime(threads=2))


class Staging:
    """Pinned-staging stand-in (plain host memory with the fake driver)."""

    def __init__(self, tokens):
        self.tensors = dict(input=torch.empty(tokens, H), ids=torch.empty(tokens, K, dtype=torch.int32),
                            weights=torch.empty(tokens, K), padding=torch.empty(tokens, dtype=torch.uint8),
                            output=torch.empty(tokens, H))
        t = self.tensors
        self.native = _lk.HostStaging(t["input"].data_ptr(), t["ids"].data_ptr(), t["weights"].data_ptr(),
                                      t["padding"].data_ptr(), t["output"].data_ptr(),
                                      io_bytes=t["input"].numel() * 4, topk_bytes=t["ids"].numel() * 4,
                                      padding_bytes=tokens)


def inputs(tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=generator)
    ids = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, K, generator=generator)
    return x, ids, weights


def begin(bridge, engine, staging, x, ids, weights, padding=None, replayable=False):
    return bridge.begin(0, engine._native, x.data_ptr(), 0, x.shape[0], ids.data_ptr(), weights.data_ptr(), K,
                        padding.data_ptr() if padding is not None else 0, staging.native, replayable)


def test_work_runs_in_stream_order_and_matches_lk(fake_driver, engine):
    library, control = fake_driver
    bridge = _lk.StreamedForwards(_lk.CudaDriver(library))
    staging = Staging(8)
    x, ids, weights = inputs(5, seed=1)
    out = torch.full((5, H), float("nan"))
    handle = begin(bridge, engine, staging, x, ids, weights)
    # Something queued between begin and finish (the shared experts) would run here.
    bridge.finish(0, handle, out.data_ptr())
    # Queued, not run: nothing has been computed or copied yet.
    assert control.fake_recorded() == 6  # 3 copies in, start, wait, copy out
    assert torch.isnan(out).all()
    control.fake_run(1)
    assert torch.equal(out, engine.forward(x, ids, weights))
    assert bridge.take_error() == ""


def test_eager_records_are_reused(fake_driver, engine):
    library, control = fake_driver
    bridge = _lk.StreamedForwards(_lk.CudaDriver(library))
    staging = Staging(4)
    for seed in range(3):
        x, ids, weights = inputs(4, seed)
        out = torch.empty(4, H)
        bridge.finish(0, begin(bridge, engine, staging, x, ids, weights), out.data_ptr())
        control.fake_run(1)
        assert torch.equal(out, engine.forward(x, ids, weights))
    assert bridge.records == 1


def test_captured_sequence_replays_with_fewer_tokens(fake_driver, engine):
    """As in a CUDA graph captured for 8 tokens: the same recording replays on new data, and
    rows flagged as padding are skipped (their ids, garbage here, are never routed) and zero."""
    library, control = fake_driver
    bridge = _lk.StreamedForwards(_lk.CudaDriver(library))
    staging = Staging(8)
    # The "graph's" input buffers, written before every replay as vLLM does.
    x, ids, weights = torch.empty(8, H), torch.empty(8, K, dtype=torch.int32), torch.empty(8, K)
    padding = torch.zeros(8, dtype=torch.bool)
    out = torch.empty(8, H)
    bridge.finish(0, begin(bridge, engine, staging, x, ids, weights, padding, replayable=True), out.data_ptr())
    recorded = control.fake_recorded()
    for real, seed in ((8, 10), (3, 11), (1, 12), (6, 13)):
        new_x, new_ids, new_weights = inputs(real, seed)
        x.normal_()
        x[:real] = new_x
        ids.fill_(10_000)  # out of range: routing a padding row would be an error
        ids[:real] = new_ids
        weights.fill_(1.0)
        weights[:real] = new_weights
        padding.fill_(True)
        padding[:real] = False
        control.fake_run(0)
        assert bridge.take_error() == ""
        assert torch.equal(out[:real], engine.forward(new_x, new_ids, new_weights))
        assert not out[real:].any()
    assert control.fake_recorded() == recorded  # replays add nothing
    assert bridge.records == 1
    control.fake_run(1)  # drop the recording


def test_error_in_a_host_function_zeroes_rows_and_is_reported(fake_driver, engine):
    library, control = fake_driver
    bridge = _lk.StreamedForwards(_lk.CudaDriver(library))
    staging = Staging(4)
    x, ids, weights = inputs(4, seed=5)
    ids[2, 1] = E  # not an expert
    out = torch.full((4, H), float("nan"))
    bridge.finish(0, begin(bridge, engine, staging, x, ids, weights), out.data_ptr())
    control.fake_run(1)
    assert not out.any()
    error = bridge.take_error()
    assert "topk_ids[2, 1]" in error and "valid ids" in error
    assert bridge.take_error() == ""  # reported once


def test_driver_errors_and_bad_arguments_raise(fake_driver, engine):
    library, control = fake_driver
    with pytest.raises(RuntimeError, match="cannot load the CUDA driver library /nonexistent/libcuda"):
        _lk.CudaDriver("/nonexistent/libcuda.so.1")
    bridge = _lk.StreamedForwards(_lk.CudaDriver(library))
    staging = Staging(2)
    x, ids, weights = inputs(2, seed=6)
    control.fake_fail_next(1)
    with pytest.raises(RuntimeError, match=r"cuMemcpyDtoHAsync failed: CUDA_ERROR_INVALID_VALUE \(fake\) \(1\)"):
        begin(bridge, engine, staging, x, ids, weights)
    control.fake_run(1)
    big_x, big_ids, big_weights = inputs(3, seed=7)
    with pytest.raises(ValueError, match="3 tokens do not fit the pinned staging"):
        begin(bridge, engine, staging, big_x, big_ids, big_weights)
    assert control.fake_recorded() == 0
