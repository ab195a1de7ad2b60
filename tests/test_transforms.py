"""Dequantization into bins, the logit transform and bits per dimension (MATH.md §5, §14)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from sdeflow.core.errors import InvalidArgument, SdeflowError
from sdeflow.core.statistics import mean_and_se
from sdeflow.core.transforms import Identity, Logit, ModelSpace, bits_per_dim, logit_transform
from sdeflow_builtin.datasets import image_transform
from sdeflow_builtin.dequantizers import Uniform


def images(alpha=0.05) -> ModelSpace:
    """8-bit images, uniformly dequantized, then logit with α (none when α is None)."""
    return ModelSpace(image_transform(alpha), 256, Uniform())


def dequantized(x, seed):
    z, _, _ = images(None)(x, generator=torch.Generator().manual_seed(seed))
    return z


def pixels(shape=(3, 1, 4, 4), seed=0):
    """Random 8-bit images as floats in {0, …, 255}/255, both extremes included."""
    ints = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    ints.view(-1)[:2] = torch.tensor([0, 255])
    return ints.double() / 255


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.2])
def test_logit_log_det_is_the_log_abs_det_of_the_jacobian(alpha):
    x = torch.rand(1, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    _, log_det = logit_transform(x, alpha)
    jacobian = torch.autograd.functional.jacobian(lambda v: logit_transform(v, alpha)[0], x).reshape(6, 6)
    assert float(log_det) == pytest.approx(float(torch.linalg.slogdet(jacobian).logabsdet), rel=1e-12)


def test_logit_transform_is_logit_of_the_squeezed_pixel():
    x = torch.tensor([[0.0, 0.25, 1.0]], dtype=torch.float64)
    z, _ = logit_transform(x, 0.05)
    s = 0.05 + 0.9 * x
    torch.testing.assert_close(z, torch.log(s / (1 - s)))


def test_dequantized_pixels_stay_in_their_bin():
    x = pixels()
    x_tilde = dequantized(x, 2)
    assert torch.all(x_tilde >= x * 255 / 256)
    assert torch.all(x_tilde < (x * 255 + 1) / 256)


def test_dequantization_noise_is_uniform_over_the_bin():
    x = torch.full((200000,), 100 / 255, dtype=torch.float64)
    u = dequantized(x, 3) * 256 - 100
    n = len(u)
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert float(u.var()) == pytest.approx(1 / 12, rel=0.02)


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_inverse_of_forward_rounds_back_to_the_pixels(alpha):
    space, x = images(alpha), pixels()
    z, log_det, log_q = space(x, generator=torch.Generator().manual_seed(4))
    back = space.inverse(z)
    assert torch.equal(torch.floor(back * 256) / 255, x)
    assert log_det.shape == (3,) and torch.equal(log_q, torch.zeros(3, dtype=x.dtype))


def test_forward_log_det_matches_the_logit_formula():
    z, log_det, _ = images(0.05)(pixels(), generator=torch.Generator().manual_seed(5))
    s = torch.sigmoid(z)  # = α + (1 − 2α) x̃
    expected = (math.log(0.9) - torch.log(s * (1 - s))).sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_det, expected)


def test_uniform_density_on_the_unit_cube_is_eight_bits_per_dim():
    """log p(x̃) = 0 on [0, 1)^D and no logit: bpd = −0 / (D ln 2) + log₂ 256 = 8."""
    space, x = images(None), pixels()
    _, log_det, log_q = space(x)
    log_p = torch.zeros(3, dtype=torch.float64)
    assert space.bits_offset == 8
    bpd = bits_per_dim(log_p, log_det, dim=16, bits_offset=space.bits_offset, log_q=log_q)
    torch.testing.assert_close(bpd, torch.full((3,), 8.0, dtype=torch.float64))


def test_uniform_density_seen_through_the_logit_is_eight_bits_per_dim():
    """If x̃ is uniform then s = α + (1 − 2α) x̃ is uniform on [α, 1 − α] and z = logit(s) has density
    logistic(z) / (1 − 2α) per dimension; adding the log-det must give back 8 bits exactly."""
    alpha, space, x = 0.05, images(0.05), pixels()
    z, log_det, _ = space(x, generator=torch.Generator().manual_seed(6))
    log_logistic = -z - 2 * F.softplus(-z)
    log_p_z = (log_logistic - math.log(1 - 2 * alpha)).sum(dim=(1, 2, 3))
    bpd = bits_per_dim(log_p_z, log_det, dim=16, bits_offset=space.bits_offset)
    torch.testing.assert_close(bpd, torch.full((3,), 8.0, dtype=torch.float64))


def test_bits_per_dim_converts_nats_to_bits():
    bpd = bits_per_dim(torch.tensor([-100.0]), torch.tensor([20.0]), dim=10, bits_offset=8.0)
    assert float(bpd) == pytest.approx(80 / (10 * math.log(2)) + 8)
    # log q(u | x) is a cost: a dequantizer concentrated on half of each bin (log q = D log 2) adds a bit.
    bpd_q = bits_per_dim(torch.tensor([-100.0]), torch.tensor([20.0]), dim=10, bits_offset=8.0,
                         log_q=torch.tensor([10 * math.log(2)]))
    assert float(bpd_q) == pytest.approx(float(bpd) + 1)


def test_discrete_data_without_a_dequantizer_is_refused():
    with pytest.raises(SdeflowError, match="256 levels"):
        ModelSpace(Logit(0.05), 256)


def test_identity_transform_has_zero_log_det_and_no_offset():
    x = torch.randn(4, 3)
    z, log_det = Identity().forward(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(4)) and Identity.bits_offset == 0


def test_mean_and_standard_error():
    mean, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(14 / 3) / 2)
    assert mean_and_se(torch.tensor([5.0])) == (5.0, None)  # one example: the s.e. is undefined, not 0


@pytest.mark.parametrize("alpha", [0.5, -0.1])
def test_a_logit_alpha_outside_its_range_raises_invalid_argument(alpha):
    with pytest.raises(InvalidArgument) as info:
        Logit(alpha)
    assert info.value.argument == "logit_alpha"
