import pytest
import torch

from sagan.losses import d_hinge, d_nonsaturating, g_hinge, g_nonsaturating, get_losses


def test_hinge_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = [0, 0.5, 2] -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = [0, 1, 2] -> mean 1
    assert d_hinge(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert g_hinge(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_hinge_is_zero_beyond_the_margin():
    assert d_hinge(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -3.0])).item() == 0.0


def test_nonsaturating_matches_bce():
    real, fake = torch.tensor([0.3, -1.2]), torch.tensor([0.8, -0.1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))
    assert d_nonsaturating(real, fake).item() == pytest.approx(expected.item(), rel=1e-6)
    assert g_nonsaturating(fake).item() == pytest.approx(bce(fake, torch.ones(2)).item(), rel=1e-6)


def test_loss_shape_checks_and_lookup():
    with pytest.raises(ValueError, match="1-D"):
        d_hinge(torch.zeros(2, 1), torch.zeros(2))
    assert get_losses("hinge") == (d_hinge, g_hinge)
    with pytest.raises(ValueError, match="unknown loss"):
        get_losses("wasserstein")
