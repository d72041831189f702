"""The compiled CPU kernel of the low-rank space: the same numbers as torch ops (up to rounding), independent of the
thread count, and a clear fallback or error when it cannot be built."""

import logging

import pytest
import torch
from torch import nn

from trl_es.core import KernelUnavailable, LowRankSpace, MemberNoise, cpu_kernel


requires_kernel = pytest.mark.skipif(not cpu_kernel.kernel_status()[0], reason="no C compiler on this machine")


def layers(bias: bool, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40, bias=bias), nn.Tanh(), nn.Linear(40, 16, bias=bias)).to(dtype)


def batched_output(model, kernel, rank, x, members=(0, 1, 2, 3, 4, 5)):
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    space = LowRankSpace(linears, MemberNoise(3, 6), rank=rank, kernel=kernel)
    with torch.no_grad(), space.perturbed(step=1, members=list(members), sigma=0.1):
        return model(x)


@requires_kernel
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_equals_torch_ops(rank, bias):
    model = layers(bias)
    x = torch.randn(6 * 4, 5, 24)  # 6 members x 4 rows, 5 tokens
    assert LowRankSpace([("0", model[0])], MemberNoise(3, 6), kernel="compiled").uses_compiled_kernel
    compiled = batched_output(model, "compiled", rank, x)
    reference = batched_output(model, "torch", rank, x)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-6)
    # a strided input (the kernel reads a contiguous copy) and another order of members
    strided = torch.randn(5, 6 * 4, 24).transpose(0, 1)
    torch.testing.assert_close(
        batched_output(model, "compiled", rank, strided, members=(5, 0, 3, 2, 1, 4)),
        batched_output(model, "torch", rank, strided, members=(5, 0, 3, 2, 1, 4)),
        rtol=1e-5,
        atol=1e-6,
    )


@requires_kernel
def test_result_does_not_depend_on_the_thread_count(monkeypatch):
    model = layers(bias=True)
    x = torch.randn(6 * 64, 3, 24)
    monkeypatch.setattr(cpu_kernel, "PARALLEL_ABOVE", 0)  # every call split over the threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batched_output(model, "compiled", 2, x)
        torch.set_num_threads(max(2, threads))
        several = batched_output(model, "compiled", 2, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)


@requires_kernel
def test_other_dtypes_and_autocast_use_torch_ops():
    x = torch.randn(6 * 2, 24)
    bf16 = layers(bias=True, dtype=torch.bfloat16)
    torch.testing.assert_close(
        batched_output(bf16, "compiled", 1, x.to(torch.bfloat16)), batched_output(bf16, "torch", 1, x.bfloat16())
    )
    model = layers(bias=True)  # fp32 weights, bf16 outputs under autocast: the kernel must not read them as fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = batched_output(model, "compiled", 1, x)
        reference = batched_output(model, "torch", 1, x)
    assert under_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(under_autocast, reference)


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/trl-es-cc")
    cpu_kernel._build.cache_clear()
    cpu_kernel._log_fallback_once.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernel._build.cache_clear()  # the next test builds the real kernel again
    cpu_kernel._log_fallback_once.cache_clear()


def test_without_a_compiler_auto_falls_back_and_compiled_raises(no_compiler, caplog):
    available, why = cpu_kernel.kernel_status()
    assert not available and "/nonexistent/trl-es-cc" in why
    model = layers(bias=True)
    x = torch.randn(6 * 2, 24)
    with caplog.at_level(logging.INFO, logger="trl_es.core.cpu_kernel"):
        fallback = batched_output(model, "auto", 1, x)
    assert "compiled CPU kernel is unavailable" in caplog.text
    assert not LowRankSpace([("0", model[0])], MemberNoise(3, 6), kernel="auto").uses_compiled_kernel
    torch.testing.assert_close(fallback, batched_output(model, "torch", 1, x), rtol=0, atol=0)
    with pytest.raises(KernelUnavailable, match=r"kernel='compiled'.*trl-es-cc.*kernel='auto'"):
        batched_output(model, "compiled", 1, x)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match=r"kernel must be one of \['auto', 'compiled', 'torch'\], got 'fast'"):
        batched_output(layers(bias=True), "fast", 1, torch.randn(6, 24))
