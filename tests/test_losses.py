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


def test_mode_seeking_charges_a_generator_that_ignores_its_latent():
    from sagan.losses import mode_seeking_reg

    torch.manual_seed(0)
    z = torch.randn(8, 16)
    collapsed = torch.randn(1, 1, 8, 8).repeat(8, 1, 1, 1)  # every latent gives the same image
    varied = torch.randn(8, 1, 8, 8)
    assert mode_seeking_reg(collapsed, z) > 1000 * mode_seeking_reg(varied, z)
    # the pairs are (i, i + B/2): swapping within the halves changes nothing, mixing them does
    perm = torch.cat([torch.arange(4).flip(0), torch.arange(4, 8).flip(0)])
    torch.testing.assert_close(mode_seeking_reg(varied[perm], z[perm]), mode_seeking_reg(varied, z))
    # it pushes paired images apart
    fake = varied.clone().requires_grad_(True)
    mode_seeking_reg(fake, z).backward()
    step = fake - 0.01 * fake.grad.sign()
    assert (step[:4] - step[4:]).abs().mean() > (varied[:4] - varied[4:]).abs().mean()
