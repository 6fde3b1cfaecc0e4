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


def test_same_class_distance_uses_only_pairs_of_one_label():
    from sagan.losses import same_class_distance

    torch.manual_seed(0)
    proto = torch.randn(3, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = proto[y]  # same-class images identical, different classes differ
    assert same_class_distance(x, y) == 0
    assert same_class_distance(x, None) > 0.5  # unconditional: every pair counts
    x2 = x.clone()
    x2[3] += 1.0  # the second 0 moves by 1 everywhere: the only non-zero same-class pair of three
    torch.testing.assert_close(same_class_distance(x2, y), torch.tensor(1.0 / 3))
    assert same_class_distance(x[:3], y[:3]).isnan()  # no pair of one class


def test_diversity_match_pays_only_below_the_real_distance_and_pushes_pairs_apart():
    from sagan.losses import diversity_match_reg

    torch.manual_seed(0)
    varied = torch.randn(8, 1, 8, 8)
    dist = (varied[:4] - varied[4:]).abs().mean()
    assert diversity_match_reg(varied, dist) < 1e-6  # as varied as the data: nothing to pay
    assert diversity_match_reg(varied, 0.5 * dist) == 0  # more varied: still nothing (bounded, unlike MSGAN)
    torch.testing.assert_close(diversity_match_reg(varied, 2 * dist), torch.tensor(0.5))
    collapsed = varied[:1].repeat(8, 1, 1, 1)
    assert diversity_match_reg(collapsed, dist) == 1
    assert diversity_match_reg(varied, torch.tensor(0.0)) == 0  # no real estimate yet
    fake = (varied * 0.1).requires_grad_(True)
    diversity_match_reg(fake, dist).backward()
    step = fake - 0.01 * fake.grad.sign()
    assert (step[:4] - step[4:]).abs().mean() > (fake[:4] - fake[4:]).abs().mean()
