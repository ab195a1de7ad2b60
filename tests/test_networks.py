"""The built-in networks: DDPM's U-net (parameter counts of the paper's configurations, odd sizes,
zero output at initialisation, time conditioning, channels_last, torch.compile) and the residual MLP."""

from __future__ import annotations

import pytest
import torch

from sdeflow.components.registry import build_registry
from sdeflow.components.schema import check_arguments
from sdeflow.core.errors import InvalidArgument
from sdeflow_builtin.networks import MLP, UNet
from sdeflow_builtin.networks.embedding import batch_times, sinusoidal_embedding
from sdeflow_builtin.networks.unet import ResBlock, SelfAttention, Upsample

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_attention(module: torch.nn.Module) -> int:
    return sum(isinstance(m, SelfAttention) for m in module.modules())


def randomise_output_layer(net: UNet) -> None:
    """Make the zero-initialised layers (the output conv, each residual branch's last conv, each
    attention's output projection) non-zero so comparisons are not trivially 0 == 0."""
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.conv2.weight.normal_(0, 0.05)
            if isinstance(m, SelfAttention):
                m.proj_out.weight.normal_(0, 0.05)


def test_every_block_starts_as_the_identity_and_qkv_as_three_separate_layers():
    """DDPM's initialisation: the last conv of every residual branch and the attention output projection
    are zero, so a block maps x to its shortcut of x; q, k and v each have the bound √(3/fan_avg) of a
    separate C → C layer, not of the fused C → 3C one."""
    torch.manual_seed(0)
    net = UNet((3, 16, 16), ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=4)
    temb = torch.randn(2, 64)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    attentions = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert blocks and attentions
    for block in blocks:
        assert torch.count_nonzero(block.conv2.weight) == 0 and torch.count_nonzero(block.conv2.bias) == 0
        inp = torch.randn(2, block.conv1.in_channels, 8, 8)
        assert torch.equal(block(inp, temb[:, : block.temb_proj.in_features]), block.shortcut(inp))
    for attention in attentions:
        C = attention.proj_out.in_features
        assert torch.count_nonzero(attention.proj_out.weight) == 0
        y = torch.randn(2, C, 4, 4)
        assert torch.equal(attention(y), y)
        bound = (3.0 / C) ** 0.5  # fan_avg = (C + C)/2 for each of q, k, v
        for part in attention.qkv.weight.split(C):
            part = part.detach()
            assert float(part.abs().max()) <= bound and float(part.abs().max()) > 0.9 * bound
            assert float(part.std()) == pytest.approx(bound / 3**0.5, rel=0.1)  # U(±b) has std b/√3


def test_mnist_preset_matches_the_reference_parameter_count():
    net = UNet((1, 28, 28), preset="mnist")
    assert n_parameters(net) == 1_539_329
    assert n_attention(net) == 1  # 28, 14, 7: 16 never occurs, so only the middle attends


def test_explicit_mnist_arguments_match_the_preset():
    net = UNet((1, 28, 28), ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    assert n_parameters(net) == 1_539_329


def test_cifar10_preset_matches_the_reference_parameter_count():
    net = UNet((3, 32, 32), preset="cifar10")
    assert n_parameters(net) == 35_746_307
    assert n_attention(net) == 2 + 3 + 1  # 16×16: two down blocks, three up blocks; the middle
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.rand(1))
    assert out.shape == (1, 3, 32, 32)


def test_explicit_arguments_beat_the_preset():
    net = UNet((1, 28, 28), preset="mnist", ch=64)
    assert net.conv_in.out_channels == 64
    assert net.ch_mult == (1, 2, 2)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((1, 28, 28), dict(preset="mnist")),
        ((3, 32, 32), dict(ch=32, ch_mult=(1, 2, 2), attn_resolutions=(16,))),
        ((2, 15, 9), dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)),  # 15→8→4, 9→5→3
        ((1, 7, 7), dict(TINY, resamp_with_conv=False)),  # average pooling 7→3, back up to 7
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_unet_output_has_the_input_shape(shape, kwargs, batch):
    net = UNet(shape, **kwargs)
    randomise_output_layer(net)
    with torch.no_grad():
        out = net(torch.randn(batch, *shape), torch.rand(batch))
    assert out.shape == (batch, *shape)
    assert torch.isfinite(out).all()


def test_out_channels_can_differ():
    net = UNet((1, 8, 8), out_channels=2, **TINY)
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 2, 8, 8)


@pytest.mark.parametrize("tau", [torch.tensor(0.3), torch.tensor([0.3]), torch.full((2, 1), 0.3), 0.3])
def test_times_may_be_scalar_or_column(tau):
    net = UNet((1, 8, 8), **TINY)
    randomise_output_layer(net)
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(y, tau), net(y, torch.full((2,), 0.3)))


def test_wrong_number_of_times_is_an_error():
    with pytest.raises(ValueError, match="one per example"):
        batch_times(torch.rand(3), 2)


def test_sinusoidal_embedding():
    e = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 7)
    assert e.shape == (2, 7) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.tensor([0.0, 0, 0, 1, 1, 1, 0]))
    assert e[1, 0] == pytest.approx(torch.sin(torch.tensor(500.0)).item(), abs=1e-5)


@pytest.mark.parametrize("factory, shape", [(lambda s: UNet(s, **TINY), (1, 8, 8)), (MLP, (2,))])
def test_output_is_zero_at_initialisation(factory, shape):
    net = factory(shape)
    out = net(torch.randn(4, *shape), torch.rand(4))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("factory, shape", [(lambda s: UNet(s, **TINY), (1, 8, 8)), (MLP, (2,))])
def test_time_conditioning_reaches_the_output_after_two_steps(factory, shape):
    """Two, not one: the U-net's residual branches start at zero and get no gradient while the output
    conv is still zero, so time (which enters through the branches) shows from the second step on."""
    torch.manual_seed(0)
    net = factory(shape)
    y = torch.randn(4, *shape)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.randn_like(y)
    for _ in range(2):
        optimizer.zero_grad()
        ((net(y, torch.rand(4)) - target) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        early, late = net(y, torch.full((4,), 0.1)), net(y, torch.full((4,), 0.9))
    assert early.abs().max() > 0
    assert (early - late).abs().max() > 1e-4


def test_mlp_on_2d_points():
    net = MLP((2,), hidden=64, depth=2)
    assert net(torch.randn(512, 2), torch.rand(512)).shape == (512, 2)
    assert net(torch.randn(1, 2), torch.rand(1)).shape == (1, 2)
    assert MLP((3, 4))(torch.randn(5, 3, 4), torch.rand(5)).shape == (5, 3, 4)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(ch=48), "ch"),  # not a multiple of the 32 GroupNorm groups
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, 0)), "ch_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(time_scale=0.0), "time_scale"),
        (dict(preset="imagenet"), "preset"),
    ],
)
def test_bad_unet_arguments_are_invalid_arguments(kwargs, argument):
    with pytest.raises(InvalidArgument) as info:
        UNet((3, 32, 32), **kwargs)
    assert info.value.argument == argument


def test_unet_needs_image_shaped_data():
    with pytest.raises(InvalidArgument) as info:
        UNet((2,))
    assert info.value.argument == "data_shape"


@pytest.mark.parametrize("kwargs, argument", [(dict(hidden=0), "hidden"), (dict(depth=0), "depth")])
def test_bad_mlp_arguments_are_invalid_arguments(kwargs, argument):
    with pytest.raises(InvalidArgument) as info:
        MLP((2,), **kwargs)
    assert info.value.argument == argument


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = UNet((3, 16, 16), ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
    randomise_output_layer(net)
    y, tau = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        expected = net(y, tau)
        net = net.to(memory_format=torch.channels_last)
        out = net(y.contiguous(memory_format=torch.channels_last), tau)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_as_one_transposed_conv_equals_interpolate_then_conv(channels_last):
    """The ×2 fast path is the same function as nearest ×2 then the 3×3 conv: output and gradients."""
    torch.manual_seed(0)
    up = Upsample(5, with_conv=True).double()
    with torch.no_grad():
        up.conv.bias.normal_()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    size = torch.Size((8, 6))
    fast = up(x, size)
    slow = up.conv(torch.nn.functional.interpolate(x, size=size, mode="nearest"))
    assert fast.shape == slow.shape == (2, 5, 8, 6)
    assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    g = torch.randn_like(fast)
    grads = [torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), g) for out in (fast, slow)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_upsample_to_an_odd_size_interpolates_then_convolves():
    torch.manual_seed(0)
    up = Upsample(3, with_conv=True).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    out = up(x, torch.Size((7, 8)))
    expected = up.conv(torch.nn.functional.interpolate(x, size=(7, 8), mode="nearest"))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_compile_matches_eager_with_dynamic_batch_size():
    # dynamic=True: a trainer that evaluates with another batch size recompiles with symbolic shapes,
    # which once broke on fused attention's saved strides.
    torch.manual_seed(0)
    net = UNet((1, 8, 8), ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    randomise_output_layer(net)
    try:
        compiled = torch.compile(net, dynamic=True)
        compiled(torch.randn(2, 1, 8, 8), torch.rand(2)).sum().backward()
    except Exception as e:  # e.g. no C++ compiler on this machine
        pytest.skip(f"torch.compile is unavailable here: {type(e).__name__}: {e}")
    for batch in (2, 3):
        y, tau = torch.randn(batch, 1, 8, 8), torch.rand(batch)
        net.zero_grad()
        compiled(y, tau).square().sum().backward()
        compiled_grad = net.conv_in.weight.grad.clone()
        net.zero_grad()
        net(y, tau).square().sum().backward()
        eager_grad = net.conv_in.weight.grad
        scale = eager_grad.abs().max().item()
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-4 * scale)
        with torch.no_grad():
            torch.testing.assert_close(compiled(y, tau), net(y, tau), rtol=1e-4, atol=1e-5)


def test_unet_is_twice_differentiable_in_its_input():
    """The ELBO loss differentiates a Hutchinson divergence vᵀ(∂n/∂y)v once more."""
    torch.manual_seed(0)
    net = UNet((1, 8, 8), **TINY)
    randomise_output_layer(net)
    y = torch.randn(2, 1, 8, 8, requires_grad=True)
    v = torch.randn_like(y)
    (vjp,) = torch.autograd.grad(net(y, torch.rand(2)), y, v, create_graph=True)
    (vjp * v).sum().backward()
    assert net.conv_in.weight.grad.abs().sum() > 0


def test_unet_under_bf16_autocast():
    net = UNet((3, 16, 16), ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    randomise_output_layer(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out.float()).all()


def test_the_plugin_registers_both_networks():
    registry = build_registry()
    unet = registry.get("network", "unet")
    arguments = unet.arguments
    assert {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
            "time_scale", "preset"} <= set(arguments)
    assert "data_shape" not in arguments
    assert arguments["time_scale"].default == 999.0
    assert arguments["ch_mult"].default == (1, 2, 2, 2)
    mlp = registry.get("network", "mlp").arguments
    assert {"hidden", "depth", "embed_dim", "time_scale"} <= set(mlp) and "data_shape" not in mlp


def test_yaml_values_fit_the_unet_schema():
    schema = build_registry().get("network", "unet").arguments
    checked = check_arguments({"ch_mult": [1, 2, 2], "preset": "mnist", "dropout": 0}, schema, "x", "unet")
    assert checked == {"ch_mult": (1, 2, 2), "preset": "mnist", "dropout": 0.0}
    assert n_parameters(UNet((1, 28, 28), **checked)) == 1_539_329


def test_fourier_features_are_the_sines_and_cosines_of_the_input_at_powers_of_two():
    from sdeflow_builtin.networks.embedding import FourierFeatures

    features = FourierFeatures([1, 3])
    y = torch.randn(2, 3, 4, 4)
    out = features(y)
    assert out.shape == (2, 3 * 7, 4, 4) and features.channels(3) == 21
    assert torch.equal(out[:, :3], y)
    k = 2  # the second exponent of [1, 3], channel 1: sin block first, then cos
    assert torch.allclose(out[:, 3 + 1 * 3 + 1], torch.sin(2.0**k * torch.pi * y[:, 1]), atol=1e-6)
    assert torch.allclose(out[:, 12 + 1 * 3 + 1], torch.cos(2.0**k * torch.pi * y[:, 1]), atol=1e-6)
    assert not features.state_dict()  # a checkpoint without them still loads
    with pytest.raises(InvalidArgument, match="fourier_features: must be \\[min_exp, max_exp\\]"):
        FourierFeatures([3, 1])


@pytest.mark.parametrize("factory, shape", [(lambda s, **kw: UNet(s, **TINY, **kw), (1, 8, 8)), (MLP, (2,))])
def test_networks_take_fourier_features_and_still_start_at_zero(factory, shape):
    net = factory(shape, fourier_features=[6, 7])
    y = torch.randn(4, *shape)
    out = net(y, torch.rand(4))
    assert out.shape == y.shape and torch.equal(out, torch.zeros_like(out))
    first = net.conv_in if hasattr(net, "conv_in") else net.input
    assert first.weight.shape[1] == 5 * shape[0]  # y and sin, cos at two frequencies
