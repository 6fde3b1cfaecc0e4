import pytest
import torch

from sagan.data import SAGANData, digits_to_images, images_to_digits, load_digits_arrays, scan_image_folder
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


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data\.root"):
        SAGANData("folder", root=str(tmp_path / "nope"))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        SAGANData("folder", root=str(tmp_path / "empty"))


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
