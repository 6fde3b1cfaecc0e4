"""Metrics through torch-fidelity: invariants, equality with torch-fidelity's own folder path, caching, errors."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics

from sagan import metrics as M
from sagan.data import SAGANData
from sagan.models import Generator

from conftest import write_images


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised InceptionV3 state dict with the shapes of torch-fidelity's weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        model = fe.FeatureExtractorInceptionV3(M.INCEPTION, ["2048"])
    torch.save(model.state_dict(), path)
    return path


class Images(Dataset):
    """uint8 (3, H, W) images with an access counter."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.reads = x, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.x[i]



def real_digits(split: str = "train") -> torch.Tensor:
    ds = M.UInt8Images(SAGANData("digits", resolution=32).build_dataset(split))
    return torch.stack([ds[i] for i in range(len(ds))])


def test_to_uint8_is_the_one_conversion():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    out = M.to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 5)
    assert out[0, 0, 0].tolist() == [0, 64, 128, 255, 255]
    assert torch.equal(out[:, 0], out[:, 2])  # grayscale repeated
    rgb = M.to_uint8(torch.zeros(2, 3, 4, 4))
    assert rgb.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError):
        M.to_uint8(torch.zeros(2, 2, 4, 4))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_shift():
    x = real_digits()
    same = M.compute_metrics(Images(x), Images(x.clone()), metrics="fid", feature_extractor="digits-mlp")
    assert abs(same.values["fid"]) < 1e-3
    previous = {"fid": 0.0, "kid": 0.0}
    for shift in (20, 60, 120):
        shifted = (x.int() + shift).clamp(0, 255).to(torch.uint8)
        v = M.compute_metrics(Images(shifted), Images(x), metrics="fid,kid", feature_extractor="digits-mlp",
                              kid_subset_size=500).values
        assert v["fid"] > previous["fid"] + 1e-3 and v["kid"] > previous["kid"]
        previous = v


def _tiny_generator(num_classes: int) -> Generator:
    torch.manual_seed(0)
    return Generator(32, z_dim=16, ch=8, num_classes=num_classes, img_channels=1).eval()


def test_in_memory_path_equals_torch_fidelity_on_folders(tmp_path, inception_weights):
    g = _tiny_generator(10)
    reference = real_digits()[:150]
    produced = []
    orig = M.FidelityGenerator.forward

    def record(self, z):
        out = orig(self, z)
        produced.append(out.clone())
        return out

    spec = M.resolve_feature_extractor(M.INCEPTION, str(inception_weights))
    with mock.patch.object(M.FidelityGenerator, "forward", record):
        ours = M.compute_metrics(g, Images(reference), metrics="fid,kid", num_samples=100, feature_extractor=spec,
                                 fid_layer="64", seed=3, batch_size=64, device="cpu", kid_subset_size=50)
    fakes = torch.cat(produced)
    assert fakes.shape == (100, 3, 32, 32)
    for folder, images in (("fake", fakes), ("real", reference)):
        (tmp_path / folder).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / folder / f"{i:04d}.png")
    theirs = calculate_metrics(
        input1=str(tmp_path / "fake"), input2=str(tmp_path / "real"), cuda=False, fid=True, kid=True,
        feature_extractor=M.INCEPTION, feature_extractor_weights_path=str(inception_weights),
        feature_layer_fid="64", feature_layer_kid="64", kid_subset_size=50, rng_seed=3, verbose=False,
        save_cpu_ram=True,
    )
    fid_theirs = theirs["frechet_inception_distance"]
    assert fid_theirs > 0
    assert ours.values["fid"] == pytest.approx(fid_theirs, rel=1e-3)
    assert ours.values["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    # the protocol names what was measured
    assert ours.protocol["num_input1"] == 100 and ours.protocol["num_input2"] == 150
    assert ours.protocol["feature_layers"]["fid"] == "64"
    assert ours.protocol["feature_extractor_weights_sha256"] == M.sha256_file(inception_weights)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_conditional_and_unconditional_generators(num_classes):
    g = _tiny_generator(num_classes)
    ref = Images(real_digits()[:200])
    a = M.compute_metrics(g, ref, metrics="fid,isc", num_samples=100, feature_extractor="digits-mlp", seed=1)
    b = M.compute_metrics(g, ref, metrics="fid,isc", num_samples=100, feature_extractor="digits-mlp", seed=1)
    assert np.isfinite(a.values["fid"]) and a.values["fid"] > 0 and a.values["isc"] >= 1.0
    assert a.values == b.values  # seeded latents and labels: reproducible


def test_conditional_labels_are_drawn_by_our_seeded_generator():
    g = _tiny_generator(10)
    seen = []
    orig = g.forward
    g.forward = lambda z, y=None: (seen.append(y), orig(z, y))[1]
    wrapper = M.FidelityGenerator(g, seed=5)
    assert wrapper.num_classes == 0  # torch-fidelity's own (np.int) conditional path is never used
    wrapper(torch.randn(6, 16))
    again = M.FidelityGenerator(g, seed=5)
    again(torch.randn(6, 16))
    assert seen[0] is not None and torch.equal(seen[0], seen[1])


def test_reference_statistics_are_cached_and_invalidated(tmp_path):
    cache = str(tmp_path / "cache")
    g = _tiny_generator(0)
    folder = tmp_path / "imgs"
    write_images(folder, 80, size=32)

    def run(resolution: int) -> Images:
        dm = SAGANData("folder", root=str(folder), resolution=resolution)
        ds = M.UInt8Images(dm.build_dataset("train", augment=False))
        counting = Images(torch.stack([ds[i] for i in range(len(ds))]))
        name = f"sagan-folder-train-{dm.fingerprint('train')}"
        M.compute_metrics(g, counting, metrics="fid", num_samples=64, feature_extractor="digits-mlp",
                          input2_cache_name=name, cache_root=cache)
        return counting

    assert run(32).reads > 0  # first call computes the reference statistics
    assert run(32).reads == 0  # second call reuses them: the reference set is not read at all
    assert run(64).reads > 0  # another resolution: another cache entry
    p = folder / "img_000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)  # the data changes
    assert run(32).reads > 0


def test_too_few_images_or_samples_is_a_clear_error():
    g = _tiny_generator(0)
    ref = Images(real_digits()[:100])
    with pytest.raises(M.MetricsError, match="at least 64 images.*--allow-few-samples"):
        M.compute_metrics(g, ref, metrics="fid", num_samples=20, feature_extractor="digits-mlp")
    few = M.compute_metrics(g, ref, metrics="fid", num_samples=20, feature_extractor="digits-mlp", allow_few_samples=True)
    assert np.isfinite(few.values["fid"]) and few.protocol["allow_few_samples"] is True
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.compute_metrics(g, ref, metrics="fid", num_samples=1, feature_extractor="digits-mlp", allow_few_samples=True)
    with pytest.raises(M.MetricsError, match="positive integer"):
        M.compute_metrics(g, ref, metrics="fid", num_samples=0, feature_extractor="digits-mlp")
    with pytest.raises(M.MetricsError, match="reference/second set has 30"):
        M.compute_metrics(g, Images(real_digits()[:30]), metrics="kid", num_samples=100, feature_extractor="digits-mlp")
    with pytest.raises(M.MetricsError, match="unknown metric"):
        M.parse_metrics("fid,lpips")


def test_missing_or_foreign_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(M.MetricsError, match=r"does not exist.*weights-inception-2015-12-05"):
        M.resolve_feature_extractor(M.INCEPTION, str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(M.MetricsError, match="does not hold InceptionV3 weights"):
        M.resolve_feature_extractor(M.INCEPTION, str(bad))


def test_offline_download_failure_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv(M.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(M.MetricsError) as e:
        M.resolve_feature_extractor(M.INCEPTION)
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and M.WEIGHTS_ENV in msg


def test_weights_from_environment_variable(monkeypatch, inception_weights):
    monkeypatch.setenv(M.WEIGHTS_ENV, str(inception_weights))
    spec = M.resolve_feature_extractor(M.INCEPTION)
    assert spec.weights_path == str(inception_weights)
