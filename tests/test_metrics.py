"""Metrics through torch-fidelity: invariants, equality with torch-fidelity's own folder path, caching, errors."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics

from sagan import diversity as Dv
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


def _evaluator(metrics: str = "fid", **kw) -> M.Evaluator:
    return M.Evaluator("digits-mlp", metrics, device="cpu", **kw)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_shift():
    x = real_digits()
    ev = _evaluator("fid,kid", kid_subset_size=500)
    ev.load_reference(Images(x))
    same = ev.images(Images(x.clone()))
    assert abs(same.values["fid"]) < 1e-3
    assert same.values["spread"] == pytest.approx(1.0, abs=1e-6)  # the same images: the same spread
    previous = {"fid": 0.0, "kid": 0.0}
    for shift in (20, 60, 120):
        shifted = (x.int() + shift).clamp(0, 255).to(torch.uint8)
        v = ev.images(Images(shifted)).values
        assert v["fid"] > previous["fid"] + 1e-3 and v["kid"] > previous["kid"]
        previous = v


def _tiny_generator(num_classes: int) -> Generator:
    torch.manual_seed(0)
    return Generator(32, z_dim=16, ch=8, num_classes=num_classes, img_channels=1).eval()


def _generated(g: Generator, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels the Evaluator draws for (n, seed): row i of one seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, g.z_dim, generator=gen)
    y = M.generated_labels(n, g.num_classes, None, gen) if g.num_classes else None  # a reference without labels
    with torch.no_grad():
        return M.to_uint8(g(z, y)), y


def test_generator_scores_equal_torch_fidelity_on_folders(tmp_path, inception_weights):
    g = _tiny_generator(10)
    reference = real_digits()[:150]
    spec = M.resolve_feature_extractor(M.INCEPTION, str(inception_weights))
    ev = M.Evaluator(spec, "fid,kid,prc", fid_layer="64", device="cpu", batch_size=64, kid_subset_size=50)
    ev.load_reference(Images(reference))
    ours = ev.generator(g, 100, seed=3)
    fakes, _ = _generated(g, 100, seed=3)
    for folder, images in (("fake", fakes), ("real", reference)):
        (tmp_path / folder).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / folder / f"{i:04d}.png")
    theirs = calculate_metrics(
        input1=str(tmp_path / "fake"), input2=str(tmp_path / "real"), cuda=False, fid=True, kid=True, prc=True,
        feature_extractor=M.INCEPTION, feature_extractor_weights_path=str(inception_weights),
        feature_layer_fid="64", feature_layer_kid="64", feature_layer_prc="64", kid_subset_size=50, rng_seed=3,
        verbose=False, save_cpu_ram=True,
    )
    fid_theirs = theirs["frechet_inception_distance"]
    assert fid_theirs > 0
    assert ours.values["fid"] == pytest.approx(fid_theirs, rel=1e-3)
    assert ours.values["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert ours.values["precision"] == pytest.approx(theirs["precision"], abs=1e-9)
    assert ours.values["recall"] == pytest.approx(theirs["recall"], abs=1e-9)
    # the protocol names what was measured
    assert ours.protocol["num_generated"] == 100 and ours.protocol["num_reference"] == 150
    assert ours.protocol["feature_layers"]["fid"] == "64" and ours.protocol["prc_neighborhood"] == 3
    assert ours.protocol["feature_extractor_weights_sha256"] == M.sha256_file(inception_weights)
    assert ours.protocol["torch"] == torch.__version__ and ours.protocol["torch_fidelity"]


def test_generated_labels_follow_the_reference_class_frequencies():
    gen = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.bincount(M.generated_labels(1000, 10, None, gen()), minlength=10).tolist() == [100] * 10
    assert torch.bincount(M.generated_labels(10, 3, None, gen())).tolist() == [4, 3, 3]  # largest remainder, ties low
    counts = torch.tensor([600, 300, 100])
    assert torch.bincount(M.generated_labels(50, 3, counts, gen())).tolist() == [30, 15, 5]
    assert torch.bincount(M.generated_labels(7, 3, counts, gen())).tolist() == [4, 2, 1]  # 4.2, 2.1, 0.7
    a, b = M.generated_labels(50, 3, counts, gen(1)), M.generated_labels(50, 3, counts, gen(2))
    assert torch.equal(a, M.generated_labels(50, 3, counts, gen(1))) and not torch.equal(a, b)  # seeded order
    assert M.generated_labels(5, 0, None, gen()).tolist() == [0] * 5


class _ClassLookup(torch.nn.Module):
    """A "generator" that draws a real image of the class asked for: a perfect class-conditional model."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.images, self.labels, self.num_classes, self.z_dim = images, labels, num_classes, 4
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.asked: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.asked.append(y)
        pick = [int(torch.nonzero(self.labels == c)[int(abs(v) * 1e4) % int((self.labels == c).sum())])
                for c, v in zip(y.tolist(), z[:, 0].tolist())]
        return self.images[pick].float() / 127.5 - 1.0


def test_an_imbalanced_reference_is_met_with_its_class_frequencies():
    """On a set where two classes of ten hold half the images, a perfect class-conditional model asked for its
    classes as often as the data has them scores near the data; asked uniformly, it would be penalised."""
    ds = SAGANData("digits", resolution=32).build_dataset("train")
    x, labels = real_digits(), torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    keep = (labels < 2) | (torch.arange(len(labels)) % 6 == 0)  # classes 0, 1 whole; the rest a sixth
    x, labels = x[keep], labels[keep]
    ev = _evaluator("fid")
    ev.load_reference(torch.utils.data.TensorDataset(x, labels), num_classes=10)
    assert torch.equal(ev.reference.class_counts, torch.bincount(labels, minlength=10))
    g = _ClassLookup(x, labels, 10)
    matched = ev.generator(g, 600, seed=0)
    asked = torch.bincount(torch.cat(g.asked), minlength=10)
    expected = 600 * torch.bincount(labels, minlength=10).double() / len(labels)
    assert (asked - expected).abs().max() <= 1
    assert matched.protocol["generated_labels"] == "reference class frequencies"
    ev.reference.class_counts = None  # equal shares, as before class frequencies were kept
    uniform = ev.generator(g, 600, seed=0)
    assert matched.values["fid"] < uniform.values["fid"] / 2, (matched.values, uniform.values)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_conditional_and_unconditional_generators(num_classes):
    g = _tiny_generator(num_classes)
    ev = _evaluator("fid,isc,prc")
    ev.load_reference(Images(real_digits()[:200]))
    a = ev.generator(g, 100, seed=1).values
    b = ev.generator(g, 100, seed=1).values
    assert np.isfinite(a["fid"]) and a["fid"] > 0 and a["isc"] >= 1.0
    assert 0 <= a["precision"] <= 1 and 0 <= a["recall"] <= 1 and a["spread"] > 0
    assert a == b  # seeded latents and labels: reproducible
    assert ev.generator(g, 100, seed=2).values["fid"] != a["fid"]


class Labelled(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_spread_and_recall_see_a_generator_that_draws_one_image_per_class():
    """The failure a classifier's accuracy cannot see: every sample of a class is the same (right) digit."""
    ds = SAGANData("digits", resolution=32)
    train, test = ds.build_dataset("train"), ds.build_dataset("test")
    ev = _evaluator("fid,prc")
    ev.load_reference(train, num_classes=10)
    real = ev.images(test, num_classes=10).values
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    first = {c: int(torch.nonzero(y == c)[0]) for c in range(10)}
    collapsed = torch.stack([x[first[int(c)]] for c in y])  # each class: copies of its first image
    one = ev.images(Labelled(collapsed, y), num_classes=10).values
    assert 0.8 < real["spread"] < 1.25 and real["spread_min"] > 0.6  # real held-out digits: as varied as the data
    assert one["spread"] < 0.05 and one["spread_min"] < 0.05
    assert one["recall"] < 0.5 * real["recall"]
    assert one["precision"] > 0.5  # every copy is a real digit: precision alone would not notice


def test_class_spread_is_mean_pairwise_distance_per_class():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    s = Dv.class_spread(f, labels, 4)
    assert s[0] == pytest.approx(5.0) and s[1] == 0.0
    assert torch.isnan(s[2]) and torch.isnan(s[3])  # fewer than two samples


def test_ndb_and_jsd_of_bin_histograms():
    """Richardson & Weiss's pooled two-proportion test per bin, and the Jensen-Shannon divergence in nats."""
    same = torch.tensor([40, 30, 20, 10])
    assert Dv.ndb_jsd(same, same * 3) == (0.0, pytest.approx(0.0, abs=1e-12))  # same proportions, other count
    ndb, jsd = Dv.ndb_jsd(torch.tensor([10, 10, 0, 0]), torch.tensor([0, 0, 10, 10]))
    assert ndb == 1.0 and jsd == pytest.approx(np.log(2))  # disjoint: every bin differs, JSD is ln 2
    # 50/50 real vs 30/70 generated, 100 each: pooled 0.4, se = sqrt(0.4 * 0.6 * 0.02) = 0.0693, z = 2.89 > 1.96
    assert Dv.ndb_jsd(torch.tensor([50, 50]), torch.tensor([30, 70]))[0] == 1.0
    assert Dv.ndb_jsd(torch.tensor([50, 50]), torch.tensor([45, 55]))[0] == 0.0  # z = 0.71: within chance
    assert Dv.ndb_jsd(torch.tensor([50, 50]), torch.tensor([37, 63]))[0] == 0.0  # z = 1.85: two-sided, not 1.64
    # one of four bins emptied, the rest as the real shares: only that bin and the one that took its samples
    ndb, _ = Dv.ndb_jsd(torch.tensor([250, 250, 250, 250]), torch.tensor([250, 250, 500, 0]))
    assert ndb == 0.5


def test_bins_see_a_generator_that_drops_whole_kinds():
    """Unconditional mode dropping: the samples are real digits (precision is perfect) but two kinds are gone.
    Bins of the real features see it without labels; real held-out digits read about the test's level."""
    ds = SAGANData("digits", resolution=32)
    train, test = ds.build_dataset("train"), ds.build_dataset("test")
    ev = _evaluator("fid,prc")
    ev.load_reference(train)  # no labels: the unconditional reference
    assert ev.reference.bins is not None and len(ev.reference.bins) == Dv.NDB_BINS
    assert int(ev.reference.bin_counts.sum()) == len(train)
    real = ev.images(test)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    keep = x[(y != 3) & (y != 7)]
    dropped = keep[torch.arange(len(x)) % len(keep)]  # as many images, threes and sevens missing
    gone = ev.images(Labelled(dropped, torch.zeros(len(x), dtype=torch.long))).values
    assert real.values["ndb"] <= 0.15 and real.values["jsd"] < 0.02
    assert gone["ndb"] >= 0.25 and gone["jsd"] > 3 * real.values["jsd"]
    assert real.protocol["ndb_bins"] == Dv.NDB_BINS and real.protocol["ndb_alpha"] == Dv.NDB_ALPHA


def test_reference_too_small_for_bins_scores_without_them():
    ev = _evaluator("fid", allow_few_samples=True)
    ev.load_reference(Images(real_digits()[:19]))
    assert ev.reference.bins is None
    values = ev.images(Images(real_digits("test")[:30])).values
    assert "fid" in values and "ndb" not in values and "jsd" not in values


def test_reference_statistics_are_cached_and_invalidated(tmp_path):
    cache = str(tmp_path / "cache")
    g = _tiny_generator(0)
    folder = tmp_path / "imgs"
    write_images(folder, 80, size=32)

    def run(resolution: int, metrics: str = "fid") -> Images:
        dm = SAGANData("folder", root=str(folder), resolution=resolution)
        ds = M.UInt8Images(dm.build_dataset("train"))
        counting = Images(torch.stack([ds[i] for i in range(len(ds))]))
        ev = _evaluator(metrics)
        ev.load_reference(counting, cache_name=dm.reference_cache_name("train", ev.spec.weights_sha256),
                          cache_root=cache)
        ev.generator(g, 64)
        return counting

    assert run(32).reads > 0  # first call computes the reference statistics
    assert run(32).reads == 0  # second call reuses them: the reference set is not read at all
    assert run(32, "fid,prc").reads > 0  # precision/recall need the features themselves, not cached yet
    assert run(32, "fid,prc").reads == 0
    assert run(64).reads > 0  # another resolution: another cache entry
    for entry in Path(cache).glob("*-64.sagan.pt"):  # an entry written before the bins existed: computed again
        old = torch.load(entry, weights_only=True)
        torch.save({k: v for k, v in old.items() if k not in ("bins", "bin_counts")}, entry)
    assert run(64).reads > 0
    assert run(64).reads == 0
    p = folder / "img_000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)  # the data changes
    assert run(32).reads > 0


def test_large_references_keep_a_seeded_subset_of_features_for_kid_and_recall(tmp_path, monkeypatch):
    """k-NN recall needs every real-real distance: a reference over the cap keeps a seeded subset of its features
    for KID and precision/recall (the same rows however it is computed or cached); FID's moments use every image."""
    monkeypatch.setattr(M, "REFERENCE_FEATURES_MAX", 100)
    real = real_digits()[:300]
    full = _evaluator("fid,prc,kid")
    full.load_reference(Images(real))  # features of all 300, for comparison
    monkeypatch.setattr(M, "REFERENCE_FEATURES_MAX", 10_000)
    uncapped = _evaluator("fid,prc,kid")
    uncapped.load_reference(Images(real))
    monkeypatch.setattr(M, "REFERENCE_FEATURES_MAX", 100)
    layer = full.layers["prc"]
    every = uncapped.reference.stats[layer]["features"]  # (300, D)
    kept = full.reference.stats[layer]["features"]
    assert every.shape[0] == 300 and kept.shape[0] == 100 and full.reference.count == 300
    rows = [int(torch.nonzero((every == r).all(1))[0]) for r in kept]
    assert rows == sorted(rows) and len(set(rows)) == 100 and rows[-1] > 150  # spread over the set, in order
    assert torch.allclose(full.reference.stats[full.layers["fid"]]["mu"], every.double().mean(0).to(
        full.reference.stats[full.layers["fid"]]["mu"].dtype), atol=1e-5)  # FID: all 300
    protocol = full.images(Images(real_digits("test")[:120])).protocol
    assert protocol["num_reference"] == 300 and protocol["num_reference_features"] == 100
    # a cache entry written with all 300 rows (before the cap, or under a larger one) is read as the same subset
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(M, "REFERENCE_FEATURES_MAX", 10_000)
    _evaluator("fid,prc,kid").load_reference(Images(real), cache_name="digits300", cache_root=cache)
    monkeypatch.setattr(M, "REFERENCE_FEATURES_MAX", 100)
    counting = Images(real)
    cached = _evaluator("fid,prc,kid")
    cached.load_reference(counting, cache_name="digits300", cache_root=cache)
    assert counting.reads == 0 and torch.equal(cached.reference.stats[layer]["features"], kept)


def test_a_reference_cache_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    """The cache only saves time: on a full disk (torch's writer raises a RuntimeError without the errno) the
    evaluation goes on with the statistics it computed, says so once, and leaves no partial file behind."""
    import shutil

    real = real_digits()[:120]
    expected = _evaluator("fid")
    expected.load_reference(Images(real))

    def full_disk(obj, f, *a, **k):
        f.write(b"partial") if hasattr(f, "write") else Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2112 vs 2000")

    monkeypatch.setattr(M.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    ev = _evaluator("fid")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="could not cache the reference statistics.*the disk is full"):
        ev.load_reference(Images(real), cache_name="digits120", cache_root=str(cache))
    assert list(cache.rglob("*")) == [] or all(p.is_dir() for p in cache.rglob("*"))
    layer = ev.layers["fid"]
    assert torch.equal(ev.reference.stats[layer]["mu"], expected.reference.stats[layer]["mu"])


def test_too_few_images_or_samples_is_a_clear_error():
    g = _tiny_generator(0)
    ev = _evaluator("fid")
    ev.load_reference(Images(real_digits()[:100]))
    with pytest.raises(M.MetricsError, match="at least 64 images.*--allow-few-samples"):
        ev.generator(g, 20)
    few = _evaluator("fid", allow_few_samples=True)
    few.load_reference(Images(real_digits()[:100]))
    res = few.generator(g, 20)
    assert np.isfinite(res.values["fid"]) and res.protocol["allow_few_samples"] is True
    with pytest.raises(M.MetricsError, match="at least 2"):
        few.generator(g, 1)
    with pytest.raises(M.MetricsError, match="positive integer"):
        ev.generator(g, 0)
    kid = _evaluator("kid")
    kid.load_reference(Images(real_digits()[:30]))
    with pytest.raises(M.MetricsError, match="reference set has 30"):
        kid.generator(g, 100)
    with pytest.raises(M.MetricsError, match="unknown metric"):
        M.parse_metrics("fid,lpips")


def test_a_set_too_small_is_refused_with_the_fixes_that_apply_to_it(inception_weights):
    """The fix named is the one that grows that set (--num-samples grows only the generated one; a reference or a
    floor is what the data holds), and the numbered layers every set fits, by the command's own flags."""
    spec = M.resolve_feature_extractor(M.INCEPTION, str(inception_weights))
    ev = M.Evaluator(spec, "fid,prc", device="cpu")
    with pytest.raises(M.MetricsError) as e:
        ev.check_counts({"generated": 1000, "reference": 300})
    assert str(e.value) == ("FID on 2048-dimensional features needs at least 2048 images per set, but the generated "
                            "set has 1000: raise --num-samples to at least 2048, choose a layer of at most 300 "
                            "dimensions (--fid-layer 192 or 64) or accept a biased number with --allow-few-samples")
    with pytest.raises(M.MetricsError, match=r"the reference set has 300: choose a layer of at most 300 dimensions "
                                             r"\(--fid.fid_layer 192 or 64\)$"):
        ev.check_counts({"generated": 3000, "reference": 300}, advice={}, layer_flag="--fid.fid_layer",
                        allow_flag=None)
    with pytest.raises(M.MetricsError, match=r"the floor set has 50: accept a biased number with --allow-few"):
        ev.check_counts({"generated": 3000, "floor": 50})  # no numbered layer as small as 50
    ev.check_counts({"generated": 2048, "reference": 2048})
    M.Evaluator(spec, "fid", "192", device="cpu").check_counts({"generated": 300, "reference": 192})


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ev = _evaluator("fid,prc,isc")
        ev.load_reference(SAGANData("digits", resolution=32).build_dataset("train"), num_classes=10)
        res = ev.generator(_tiny_generator(10), 130, seed=4)  # 130 = 65 + 65: shards of equal size
        odd = ev.generator(_tiny_generator(10), 129, seed=4)  # 64 + 65
        torch.save({"values": res.values, "odd": odd.values, "ref_mu": ev.reference.stats["64"]["mu"]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ev = _evaluator("fid,prc,isc")
    ev.load_reference(SAGANData("digits", resolution=32).build_dataset("train"), num_classes=10)
    single = ev.generator(_tiny_generator(10), 130, seed=4).values
    single_odd = ev.generator(_tiny_generator(10), 129, seed=4).values
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["values"] == r1["values"] and r0["odd"] == r1["odd"]  # every rank holds the same numbers
    torch.testing.assert_close(r0["ref_mu"], ev.reference.stats["64"]["mu"], rtol=1e-6, atol=1e-6)
    for dist_v, one in ((r0["values"], single), (r0["odd"], single_odd)):
        assert dist_v.keys() == one.keys() >= {"fid", "precision", "recall", "spread", "isc"}
        for k in one:
            assert dist_v[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


CAPS = [(M, "REFERENCE_FEATURES_MAX", 150), (Dv, "NDB_FIT_MAX", 300), (Dv, "SPREAD_MAX_TOTAL", 400)]  # 40 per class:
# 850 of 1,437 rows


def _capped_reference_worker(rank: int, world: int, port: int, out: str) -> None:
    """A reference on ``world`` ranks with small caps; records the largest block of features any gather moved."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    for module, k, v in CAPS:
        assert hasattr(module, k)
        setattr(module, k, v)
    gathered = [0]
    real_gather = M.gather_rows

    def spy(t: torch.Tensor) -> torch.Tensor:
        out_t = real_gather(t)
        if out_t.dim() == 2:
            gathered[0] = max(gathered[0], len(out_t))
        return out_t

    M.gather_rows = spy
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ev = _evaluator("fid,prc")
        ev.load_reference(SAGANData("digits", resolution=32).build_dataset("train"), num_classes=10)
        r = ev.reference
        torch.save({"stats": r.stats["64"], "spread": r.spread, "bins": r.bins, "bin_counts": r.bin_counts,
                    "gathered": gathered[0]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_reference_gathers_only_the_rows_it_keeps(tmp_path, monkeypatch):
    """Each rank holds its own shard's features; moments and bin counts are summed over ranks and only the rows
    the spread, the bins' fit and precision/recall use are gathered: the statistics equal one process's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_capped_reference_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for module, k, v in CAPS:
        monkeypatch.setattr(module, k, v)
    ev = _evaluator("fid,prc")
    ev.load_reference(SAGANData("digits", resolution=32).build_dataset("train"), num_classes=10)
    one = ev.reference
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert 0 < r0["gathered"] <= 850 < 1437  # never every image's features
    assert Dv.spread_per_class(10) == 40 and Dv.spread_per_class(1000) == 2 and Dv.spread_per_class(3) == 133
    for r in (r0, r1):
        torch.testing.assert_close(r["stats"]["mu"], one.stats["64"]["mu"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["stats"]["sigma"], one.stats["64"]["sigma"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["stats"]["features"], one.stats["64"]["features"], rtol=1e-5, atol=1e-5)
        assert r["stats"]["features"].shape == (150, 64) and int(r["stats"]["count"]) == 1437
        torch.testing.assert_close(r["spread"], one.spread, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["bins"], one.bins, rtol=1e-4, atol=1e-4)
        assert int(r["bin_counts"].sum()) == 150 and torch.equal(r["bin_counts"], one.bin_counts)  # the subset's


def test_reference_is_streamed_holding_only_the_rows_it_reads(monkeypatch):
    """One pass over the reference: its moments equal those of all its features at once (FID uses every image),
    while the process never holds more than the rows that the spread, the bins' fit and KID / precision-recall
    read, however large the set; the bins count the KID / precision-recall subset."""
    for module, k, v in CAPS:
        monkeypatch.setattr(module, k, v)
    held: list[int] = []
    real_add = M.ReferenceStream.add

    def spy(self: M.ReferenceStream, *args) -> None:
        real_add(self, *args)
        held.append(self.held)

    monkeypatch.setattr(M.ReferenceStream, "add", spy)
    data = SAGANData("digits", resolution=32).build_dataset("train")
    ev = _evaluator("fid,prc", batch_size=50)
    ev.load_reference(data, num_classes=10)
    assert len(held) == 29 and 0 < max(held) <= 850 < 1437  # 150 + 300 + 40 per class, at most
    every, labels = ev._dataset_features(data, "all of them")
    f, ref = every["64"], ev.reference
    mu, sigma = M._moments(f)
    torch.testing.assert_close(ref.stats["64"]["mu"], mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.stats["64"]["sigma"], sigma, rtol=1e-10, atol=1e-12)
    subset = f[M.reference_subset_indices(1437)]  # (150, 64)
    assert torch.equal(ref.stats["64"]["features"], subset)
    assert torch.equal(ref.bin_counts, Dv.bin_counts(subset, ref.bins)) and int(ref.bin_counts.sum()) == 150
    first = Dv.spread_indices(labels, 10)  # the first 40 of each class
    assert len(first) == 400
    torch.testing.assert_close(ref.spread, Dv.class_spread(f[first], labels[first], 10))


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
