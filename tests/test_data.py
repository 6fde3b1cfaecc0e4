import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from sagan.data import (ImageLoader, SAGANData, digits_to_images, images_to_digits, load_digits_arrays,
                        scan_image_folder)
from sagan.errors import ConfigError, DataError

from conftest import write_images


def _batch(dm: SAGANData):
    """The first training batch as the model sees it: uint8 from the loader, decoded on the device."""
    raw = next(iter(dm.train_dataloader()))
    assert raw[0].dtype == torch.uint8  # workers serve uint8; float conversion happens after the transfer
    return dm.on_after_batch_transfer(raw, 0)


def test_digits_are_real_offline_and_upsampled():
    dm = SAGANData("digits", resolution=32, batch_size=16)
    assert dm.num_classes == 10 and dm.channels == 1
    dm.setup("fit")
    x, y = _batch(dm)
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3
    tr, te = load_digits_arrays("train"), load_digits_arrays("test")
    assert len(tr[0]) + len(te[0]) == 1797 and len(te[0]) == 360
    assert sorted(set(te[1].tolist())) == list(range(10))


def test_digits_round_trip_to_8x8():
    images8, _ = load_digits_arrays("test")
    back = images_to_digits(digits_to_images(images8[:20], 32)).reshape(20, 8, 8)
    assert (back - images8[:20]).abs().mean() < 1.0  # intensities 0..16: the views agree closely


def test_digits_at_64_with_three_channels():
    dm = SAGANData("digits", resolution=64, channels=3, batch_size=8)
    dm.setup()
    x, _ = _batch(dm)
    assert x.shape == (8, 3, 64, 64)


def test_flat_folder_is_unconditional(tmp_path):
    write_images(tmp_path / "flat", 12, size=50)
    dm = SAGANData("folder", root=str(tmp_path / "flat"), resolution=32, batch_size=4)
    assert dm.num_classes == 0
    dm.setup()
    x, y = _batch(dm)
    assert x.shape == (4, 3, 32, 32) and (y == 0).all()


def test_class_folders_are_conditional(class_folder):
    dm = SAGANData("folder", root=str(class_folder), resolution=64, channels=1, batch_size=5)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    dm.setup()
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert sorted(labels.unique().tolist()) == [0, 1]
    x, _ = _batch(dm)
    assert x.shape == (5, 1, 64, 64)


def test_mixed_modes_and_sizes_are_normalised(tmp_path):
    write_images(tmp_path / "mix", 3, size=20, mode="L")
    for i, p in enumerate(write_images(tmp_path / "rgb", 3, size=90)):
        p.rename(tmp_path / "mix" / f"rgb_{i}.png")
    dm = SAGANData("folder", root=str(tmp_path / "mix"), resolution=32, batch_size=6)
    dm.setup()
    x, _ = _batch(dm)
    assert x.shape == (6, 3, 32, 32)


def _ramp(h: int = 48, w: int = 64) -> np.ndarray:
    """(h, w) values rising left to right from 0 to 1."""
    return np.tile(np.linspace(0.0, 1.0, w), (h, 1))


@pytest.mark.parametrize("kind", ["uint16", "float", "int32"])
def test_high_bit_depth_images_keep_their_full_range(tmp_path, kind):
    """16-bit, 32-bit and float images map their range onto 0..255: PIL's plain convert clips them (white / black)."""
    ramp = _ramp()
    arr = {"uint16": (ramp * 65535).astype(np.uint16), "int32": (ramp * 65535).astype(np.int32),
           "float": ramp.astype(np.float32)}[kind]
    path = tmp_path / ("img.tif" if kind != "uint16" else "img.png")
    Image.fromarray(arr).save(path)
    for channels in (1, 3):
        out = ImageLoader(32, channels)(path).astype(float)  # (C, 32, 32)
        assert out.shape == (channels, 32, 32)
        row = out[0, 16]  # left to right: the ramp's middle third (centre crop of a 4:3 image)
        assert np.all(np.diff(row) >= 0) and row[0] < 100 and row[-1] > 155, row
        assert abs(out.mean() - 127.5) < 4


def test_transparent_pixels_are_composited_onto_black(tmp_path):
    """Whatever colour lies under a fully transparent pixel never reaches the model; half transparency darkens."""
    a = np.zeros((40, 40, 4), np.uint8)
    a[...] = (0, 255, 0, 0)  # invisible green
    a[10:30, 10:30] = (255, 0, 0, 255)  # opaque red
    a[:, 35:] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(a).save(tmp_path / "rgba.png")
    out = ImageLoader(40, 3)(tmp_path / "rgba.png")  # (3, 40, 40), no resizing at 40
    assert out[:, 2, 2].tolist() == [0, 0, 0]
    assert out[:, 20, 20].tolist() == [255, 0, 0]
    assert out[:, 20, 38].tolist() == [0, 0, 128]
    p = Image.new("P", (40, 40), 1)
    p.putpalette([0, 255, 0, 200, 200, 200] + [0] * 762)
    p.paste(0, (0, 0, 20, 40))  # left half: index 0, the transparent one (green in the palette)
    p.save(tmp_path / "pal.png", transparency=0)
    out = ImageLoader(40, 3)(tmp_path / "pal.png")
    assert out[:, 20, 5].tolist() == [0, 0, 0] and out[:, 20, 30].tolist() == [200, 200, 200]


def test_data_background_is_the_colour_under_transparent_pixels(tmp_path):
    """data.background: sprites drawn on white train on white; any PIL colour; a bad one names itself; the
    folder's fingerprint (reference caches) changes with it, and black is the unset default."""
    a = np.zeros((32, 32, 4), np.uint8)
    a[...] = (0, 255, 0, 0)  # invisible green
    a[8:24, 8:24] = (255, 0, 0, 255)  # opaque red
    a[:, 28:] = (0, 0, 255, 128)  # half-transparent blue
    (tmp_path / "sprites").mkdir()
    Image.fromarray(a).save(tmp_path / "sprites" / "s.png")
    root = str(tmp_path / "sprites")

    def pixels(background, channels=3):
        dm = SAGANData("folder", root=root, resolution=32, channels=channels, background=background)
        return dm.build_dataset()[0][0], dm.fingerprint()

    white, fp_white = pixels("white")
    assert white[:, 2, 2].tolist() == [255, 255, 255] and white[:, 16, 16].tolist() == [255, 0, 0]
    assert white[:, 16, 30].tolist() == [127, 127, 255]  # half blue over white
    grey, fp_grey = pixels("#808080")
    assert grey[:, 2, 2].tolist() == [128, 128, 128] and grey[:, 16, 16].tolist() == [255, 0, 0]
    assert pixels("rgb(0, 128, 0)")[0][:, 2, 2].tolist() == [0, 128, 0]
    assert pixels("white", channels=1)[0][:, 2, 2].tolist() == [255]
    black, fp_none = pixels(None)
    assert black[:, 2, 2].tolist() == [0, 0, 0] and pixels("black")[1] == fp_none
    assert len({fp_none, fp_white, fp_grey}) == 3
    with pytest.raises(ConfigError, match=r"data.background 'whte' is not a colour: use a name"):
        SAGANData("folder", root=root, resolution=32, background="whte")


def test_settings_the_chosen_data_set_does_not_read_are_refused_or_named(tmp_path):
    """configs/digits.yaml with --data.root but no --data.dataset folder trained on the digits, silently: now an
    error naming the fix. Settings that only another kind of set reads are a warning naming them."""
    from sagan.errors import SaganWarning

    write_images(tmp_path / "imgs", 4, size=32)
    with pytest.raises(ConfigError, match=r"data.root is '.*imgs' but data.dataset is 'digits'.*--data.dataset folder"):
        SAGANData("digits", root=str(tmp_path / "imgs"))
    with pytest.warns(SaganWarning, match="data.in_memory is ignored: it applies to data.dataset 'prepared'"):
        SAGANData("folder", root=str(tmp_path / "imgs"), in_memory=True)
    with pytest.warns(SaganWarning, match="data.download is ignored: it applies to data.dataset 'cifar10'"):
        SAGANData("digits", download=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAGANData("folder", root=str(tmp_path / "imgs"))
        SAGANData("digits")


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with an EXIF orientation tag is trained upright, as a viewer shows it."""
    shown = np.zeros((60, 80, 3), np.uint8)
    shown[:, :40] = (255, 0, 0)  # left half red, right half blue, as displayed
    shown[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    out = ImageLoader(32, 3)(tmp_path / "cam.jpg").astype(int)  # (3, 32, 32)
    assert out[0, :, 3].min() > 200 and out[2, :, 3].max() < 60  # left column red
    assert out[2, :, 28].min() > 200 and out[0, :, 28].max() < 60  # right column blue


def test_large_jpeg_decodes_at_reduced_scale_like_the_full_decode(tmp_path, monkeypatch):
    """JPEGs much larger than the resolution decode at 1/2..1/8 scale (fast), within 1% of the full decode."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((1024, 768), Image.Resampling.BICUBIC).save(tmp_path / "big.jpg", quality=92)
    sizes = []
    real_load = JpegImageFile.load

    def spy(self):
        out = real_load(self)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImageFile, "load", spy)
    fast = ImageLoader(32, 3)(tmp_path / "big.jpg").astype(float)
    assert sizes[-1] == (128, 96)  # 1/8: the smallest scale that keeps both sides >= 2 x 32
    with Image.open(tmp_path / "big.jpg") as img:
        full = ImageLoader(32, 3).pil(img.convert("RGB")).astype(float)
    assert sizes[-1] == (1024, 768)
    assert np.abs(fast - full).mean() < 2.55


def test_unread_image_files_are_named_in_a_warning(tmp_path):
    """A folder of phone photos (HEIC) with a few JPEGs among them must not train on the JPEGs silently."""
    paths = write_images(tmp_path / "phone", 4)
    (tmp_path / "phone" / "IMG_0001.HEIC").write_bytes(b"heic")
    (tmp_path / "phone" / "IMG_0002.heic").write_bytes(b"heic")
    (tmp_path / "phone" / "notes.txt").write_text("not an image")
    paths[0].rename(tmp_path / "phone" / "anim.gif")  # a PNG under a .gif name: read (PIL goes by content)
    with pytest.warns(UserWarning, match=r"2 \.heic file\(s\) are not read.*convert them"):
        samples, _ = scan_image_folder(tmp_path / "phone")
    assert len(samples) == 4


def test_loose_images_beside_class_folders_are_named_in_a_warning(tmp_path):
    """A flat folder with a stray subfolder would train on the subfolder alone: the unused images are counted."""
    write_images(tmp_path / "faces", 6)
    write_images(tmp_path / "faces" / "thumbs", 2)
    with pytest.warns(UserWarning, match=r"class subfolders \(1: thumbs\) and 6 image\(s\) directly in it, which are "
                                         r"not used"):
        samples, classes = scan_image_folder(tmp_path / "faces")
    assert classes == ["thumbs"] and len(samples) == 2
    with warnings.catch_warnings():  # class folders alone: no warning
        warnings.simplefilter("error")
        scan_image_folder(tmp_path / "faces" / "thumbs")
        write_images(tmp_path / "classes" / "a", 2)
        scan_image_folder(tmp_path / "classes")


def test_folders_of_tools_are_neither_classes_nor_images(tmp_path):
    """A zip made on a Mac unpacks with a __MACOSX folder (which would be a class of no images, or turn a flat set
    into a set of one class); a NAS adds @eaDir thumbnails inside every folder, viewers a hidden .thumbnails one
    (which would be trained as more images of the class)."""
    write_images(tmp_path / "flat", 5)
    (tmp_path / "flat" / "__MACOSX").mkdir()
    (tmp_path / "flat" / "__MACOSX" / "._img_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(tmp_path / "flat" / "@eaDir" / "img_000.png", 2)
    samples, classes = scan_image_folder(tmp_path / "flat")
    assert classes == [] and len(samples) == 5
    for cls, n in (("cat", 3), ("dog", 4)):
        write_images(tmp_path / "classes" / cls / "sub", n)
        write_images(tmp_path / "classes" / cls / ".thumbnails", 2)
        write_images(tmp_path / "classes" / cls / "sub" / "@eaDir", 2)
    write_images(tmp_path / "classes" / "__MACOSX" / "cat", 1)
    samples, classes = scan_image_folder(tmp_path / "classes")
    assert classes == ["cat", "dog"] and [label for _, label in samples] == [0] * 3 + [1] * 4
    assert all(p.parent.name == "sub" for p, _ in samples)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data\.root"):
        SAGANData("folder", root=str(tmp_path / "nope"))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images .*: put images in it"):
        SAGANData("folder", root=str(tmp_path / "empty"))
    import zipfile

    (tmp_path / "download").mkdir()  # a data set as downloaded, not unpacked: the archive is named
    zipfile.ZipFile(tmp_path / "download" / "img_align_celeba.zip", "w").close()
    with pytest.raises(DataError, match=r"it holds 'img_align_celeba\.zip': set the path of the archive itself, "
                                        r"'.*download/img_align_celeba\.zip'"):
        SAGANData("folder", root=str(tmp_path / "download"))


def test_empty_class_folder_is_a_clear_error(class_folder):
    (class_folder / "zebra").mkdir()
    with pytest.raises(DataError, match="class folder .*zebra.* has no images"):
        scan_image_folder(class_folder)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_names_the_file(tmp_path, content):
    paths = write_images(tmp_path / "bad", 8)
    if content == "truncated":
        data = paths[3].read_bytes()
        paths[3].write_bytes(data[: len(data) // 2])
    else:
        paths[3].write_bytes(content)
    dm = SAGANData("folder", root=str(tmp_path / "bad"), resolution=32, batch_size=8)
    dm.setup()
    with pytest.raises(DataError, match=r"cannot read image .*img_003\.png.*remove or replace"):
        next(iter(dm.train_dataloader()))


def test_cifar10_without_files_says_where_to_put_them(tmp_path):
    dm = SAGANData("cifar10", root=str(tmp_path / "cifar"))
    assert dm.num_classes == 10
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*data\.download: true"):
        dm.setup()


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="not supported"):
        SAGANData("digits", resolution=28)
    with pytest.raises(ConfigError, match="data.root is required"):
        SAGANData("folder")
    with pytest.raises(ConfigError, match="channels"):
        SAGANData("digits", channels=2)


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    write_images(tmp_path / "few", 3)
    dm = SAGANData("folder", root=str(tmp_path / "few"), batch_size=8)
    with pytest.raises(DataError, match="fewer than data.batch_size"):
        dm.setup()


def test_class_counts_of_every_kind_of_labelled_set(tmp_path):
    """``class_counts`` (what ``model.fake_labels: data`` trains on) counts the images of each class, the same for a
    folder and the prepared set made from it; an unlabelled folder has none."""
    from sagan.prepared import prepare

    counts = SAGANData("digits").class_counts()
    assert counts.tolist() == [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]  # the 1,437 training digits
    assert int(SAGANData("digits").class_counts("test").sum()) == 360
    root = tmp_path / "imbalanced"
    for name, n in (("a", 5), ("b", 2), ("c", 9)):
        write_images(root / name, n, seed=n)
    folder = SAGANData("folder", root=str(root), resolution=32)
    assert folder.class_counts().tolist() == [5, 2, 9]
    prepare(str(root), tmp_path / "prep", resolution=32, workers=1, progress=False)
    assert SAGANData("prepared", root=str(tmp_path / "prep"), resolution=32).class_counts().tolist() == [5, 2, 9]
    write_images(tmp_path / "flat", 4)
    assert SAGANData("folder", root=str(tmp_path / "flat"), resolution=32).class_counts() is None
    with pytest.raises(ConfigError, match="has no split 'test'"):
        folder.class_counts("test")


def test_a_scan_stats_no_image_file(tmp_path, monkeypatch):
    """The scan reads directory entries only: on NFS or Lustre each stat is a network round trip, and every rank
    scans, so a stat per image would make a 1.28M-image folder take minutes to start."""
    import pathlib

    write_images(tmp_path / "flat", 30, size=8)
    for cls in ("cat", "dog"):
        write_images(tmp_path / "classes" / cls / "sub", 15, size=8)
    calls = []
    stat = pathlib.Path.stat
    monkeypatch.setattr(pathlib.Path, "stat", lambda self, **kw: calls.append(self) or stat(self, **kw))
    assert len(scan_image_folder(tmp_path / "flat")[0]) == 30
    assert len(scan_image_folder(tmp_path / "classes")[0]) == 30
    assert len(calls) <= 6, calls  # the roots', not the images'
