"""The fused channels-last GroupNorm+SiLU CPU kernel against PyTorch's ops: values, gradients, second
derivatives, thread-count independence, where it is used, and the fallback when it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F

from sdeflow_builtin.networks import UNet
from sdeflow_builtin.networks import group_norm_silu as fused
from sdeflow_builtin.networks.group_norm_silu import group_norm_silu

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine: the kernel cannot be built")

CHANNELS_LAST = torch.channels_last


def random_norm(channels: int, groups: int = 32) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def nhwc_input(*shape: int, mean: float = 0.5, scale: float = 2.0) -> torch.Tensor:
    x = torch.randn(shape) * scale + mean
    return x.contiguous(memory_format=CHANNELS_LAST).requires_grad_()


def reference(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """PyTorch's NCHW GroupNorm: its channels-last CPU kernel loses digits on small or off-centre groups
    (3.9e-4 at 2 values per group, over 1 at a mean of 1000 standard deviations; NCHW and ours: 4e-6)."""
    return F.silu(F.group_norm(x.contiguous(), norm.num_groups, norm.weight, norm.bias, norm.eps))


@pytest.fixture(autouse=True)
def fresh_kernel(tmp_path, monkeypatch):
    """Each test builds into its own cache folder (the build takes well under a second)."""
    monkeypatch.setenv("SDEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDEFLOW_FUSED_KERNELS", raising=False)
    fused.load_kernel.cache_clear()
    yield
    fused.load_kernel.cache_clear()


def test_the_kernel_builds_here_and_is_cached(tmp_path):
    first = fused.build_library()
    assert first.parent == tmp_path / "cache" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert fused.build_library() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert fused.load_kernel() is not None


@pytest.mark.parametrize("damage", ["truncated", "zeroed tail", "digest missing"])
def test_a_damaged_cached_kernel_is_rebuilt_with_one_line_not_loaded(tmp_path, capsys, damage):
    """A truncated shared library can map without error and crash with SIGBUS when its code runs:
    the cache is checked against the digest its build wrote, and rebuilt when it does not match."""
    library = fused.build_library()
    good = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(good[: len(good) // 2])
    elif damage == "zeroed tail":
        library.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    else:
        library.with_suffix(".sha256").unlink()
    capsys.readouterr()
    assert fused.build_library() == library
    assert library.read_bytes() == good or fused._intact(library)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and str(library) in err[0]
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(4, 8)
    assert fused.load_kernel() is not None
    torch.testing.assert_close(fused.group_norm_silu(x, norm), F.silu(norm(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [(8, 32, 28, 28), (4, 64, 14, 14), (3, 96, 9, 7), (2, 128, 7, 7), (1, 64, 5, 3), (5, 64, 1, 3)],
    ids=["1-channel-groups", "2", "3-odd-size", "4", "batch-1", "1x3"],
)
def test_values_and_gradients_match_pytorch(shape):
    torch.manual_seed(0)
    norm, x = random_norm(shape[1]), nhwc_input(*shape)
    out, expected = group_norm_silu(x, norm), reference(x, norm)
    assert out.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    inputs = (x, norm.weight, norm.bias)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_large_mean_is_normalised_without_cancellation():
    # Statistics in double: a mean 1000 standard deviations away still normalises to N(0, 1).
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    x = nhwc_input(4, 64, 8, 8, mean=1000.0, scale=1.0)
    exact = reference(x.double(), norm.double())
    torch.testing.assert_close(group_norm_silu(x, norm.float()).double(), exact, rtol=0, atol=5e-4)


@pytest.mark.parametrize("beta", [-100.0, -88.5, 100.0])
def test_saturated_units_stay_finite(beta):
    # Far out on either side exp(-y) over- or underflows; silu and its derivative must stay finite.
    torch.manual_seed(0)
    norm = random_norm(32)
    with torch.no_grad():
        norm.weight.mul_(30.0)
        norm.bias.fill_(beta)
    x = nhwc_input(2, 32, 4, 4)
    out, expected = group_norm_silu(x, norm), reference(x, norm)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)
    want = torch.autograd.grad(expected, (x, norm.weight, norm.bias), grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)


def test_a_channel_count_that_does_not_fit_the_norm_raises_pytorchs_error():
    with pytest.raises(RuntimeError, match="number of channels"):
        group_norm_silu(nhwc_input(2, 64, 4, 4), random_norm(32))


def test_the_result_does_not_depend_on_the_number_of_threads():
    torch.manual_seed(0)
    norm, x = random_norm(64), nhwc_input(6, 64, 10, 10)
    grad = torch.randn(6, 64, 10, 10).contiguous(memory_format=CHANNELS_LAST)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = group_norm_silu(x, norm)
            results.append((out, *torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_second_derivatives_are_exact():
    """The elbo loss differentiates a vector-Jacobian product again (create_graph=True)."""
    torch.manual_seed(0)
    norm, x = random_norm(64), nhwc_input(3, 64, 6, 6)
    v = torch.randn_like(x)

    def hessian_vector(fn):
        (vjp,) = torch.autograd.grad(fn(x, norm), x, v, create_graph=True)
        return torch.autograd.grad((vjp * v).sum(), (x, norm.weight, norm.bias))

    for got, want in zip(hessian_vector(group_norm_silu), hessian_vector(reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_it_is_used_only_for_float32_channels_last_cpu_tensors(monkeypatch):
    calls = []
    original = fused._GroupNormSiLU.apply
    monkeypatch.setattr(fused._GroupNormSiLU, "apply", lambda *a: calls.append(1) or original(*a))
    norm = random_norm(32)
    group_norm_silu(nhwc_input(2, 32, 4, 4), norm)
    assert calls == [1]
    group_norm_silu(torch.randn(2, 32, 4, 4), norm)  # NCHW
    group_norm_silu(nhwc_input(2, 32, 4, 4).double(), norm.double())  # float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        group_norm_silu(nhwc_input(2, 32, 4, 4), norm.float())
    wide = random_norm(2 * fused.MAX_CHANNELS, groups=32)  # more scratch than a thread's stack should hold
    group_norm_silu(nhwc_input(1, 2 * fused.MAX_CHANNELS, 1, 2), wide)
    monkeypatch.setenv("SDEFLOW_FUSED_KERNELS", "0")
    group_norm_silu(nhwc_input(2, 32, 4, 4), norm.float())
    assert calls == [1]


def test_without_a_compiler_pytorch_is_used_after_one_notice(monkeypatch, capsys):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(fused.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    torch.manual_seed(0)
    norm, x = random_norm(32), nhwc_input(2, 32, 4, 4)
    for _ in range(2):
        torch.testing.assert_close(group_norm_silu(x, norm), F.silu(norm(x)), rtol=0, atol=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernel is unavailable (no C compiler found" in err[0] and "PyTorch's GroupNorm" in err[0]


def test_a_unet_training_step_in_channels_last_matches_nchw():
    torch.manual_seed(0)
    net = UNet((1, 16, 16), ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
    y, tau = torch.randn(4, 1, 16, 16), torch.rand(4)
    grads = []
    for layout in (torch.contiguous_format, CHANNELS_LAST):
        net = net.to(memory_format=layout)
        net.zero_grad()
        net(y.contiguous(memory_format=layout), tau).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    # Some gradients are exactly 0 in theory (a conv bias that a 1-channel group norm removes), so the
    # tolerance is set by the largest gradient, not each tensor's own.
    scale = max(g.abs().max().item() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6 * scale)
