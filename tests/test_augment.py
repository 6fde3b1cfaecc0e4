"""DiffAugment: the paper's transformations, differentiable, drawn per image, the identity when off."""

import pytest
import torch

from sagan.augment import DiffAugment, color, cutout, parse_policy, translation
from sagan.errors import ConfigError


def _x(b: int = 6, c: int = 3, s: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(b, c, s, s) * 2 - 1


def test_policy_parsing():
    assert parse_policy("translation, cutout") == ("translation", "cutout")
    assert parse_policy(["color"]) == ("color",)
    assert parse_policy("") == parse_policy(None) == ()
    with pytest.raises(ConfigError, match="unknown augmentation.*model.augment"):
        parse_policy("translation,rotate")


def test_empty_policy_is_identity_and_draws_no_random_numbers():
    x = _x()
    state = torch.get_rng_state()
    aug = DiffAugment("")
    assert not aug and aug(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_translation_shifts_whole_pixels_and_pads_with_zeros():
    x = _x(b=64, c=1, s=16) + 3.0  # no zeros in the input: zeros in the output are padding
    torch.manual_seed(1)
    out = translation(x)
    assert out.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        found = None
        for dy in range(-2, 3):  # int(16 * 0.125 + 0.5) = 2
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                src = x[i][:, max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)]
                ref[:, max(0, -dy):16 + min(0, -dy), max(0, -dx):16 + min(0, -dx)] = src
                if torch.equal(out[i], ref):
                    found = (dy, dx)
        assert found is not None, f"image {i} is not a whole-pixel shift of its input"
        shifts.add(found)
    assert len(shifts) > 5  # drawn per image


def test_cutout_zeroes_one_square_per_image():
    x = _x(b=32, c=3, s=16) + 3.0
    out = cutout(x)
    zero = (out == 0).all(dim=1)  # (B, H, W)
    for i in range(len(x)):
        ys, xs = torch.nonzero(zero[i], as_tuple=True)
        assert len(ys) > 0
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert h <= 8 and w <= 8 and len(ys) == h * w  # one (possibly clipped) square of side 8
        keep = ~zero[i]
        assert torch.equal(out[i][:, keep], x[i][:, keep])
    assert len({tuple(torch.nonzero(zero[i])[0].tolist()) for i in range(len(x))}) > 5


def test_color_factors_are_per_image_and_grayscale_safe():
    x = _x(b=8, c=1)
    out = color(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out - x, (out - x)[:1].expand_as(x))  # different draws per image


def test_gradient_reaches_the_input_through_every_policy():
    x = _x().requires_grad_(True)
    out = DiffAugment("color,translation,cutout")(x)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # geometric policies alone: pixels cut out or shifted out of view get no gradient, the rest exactly theirs
    x.grad = None
    out = DiffAugment("translation,cutout")(x)
    out.sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 1.0} and (x.grad == 1).float().mean() > 0.5


def test_channels_last_input_keeps_its_layout():
    x = _x().contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = DiffAugment("translation")(x)
    torch.manual_seed(0)
    ref = DiffAugment("translation")(x.contiguous())
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
