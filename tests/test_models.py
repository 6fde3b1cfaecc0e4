import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sagan.errors import ConfigError
from sagan.layers import SelfAttention2d, minibatch_stddev, refresh_spectral_norm
from sagan.models import Discriminator, Generator, attention_layers


def _small(resolution: int, num_classes: int, img_channels: int = 3):
    torch.manual_seed(0)
    g = Generator(resolution, z_dim=16, ch=8, num_classes=num_classes, img_channels=img_channels)
    d = Discriminator(resolution, ch=8, num_classes=num_classes, img_channels=img_channels)
    return g, d


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_shapes_for_every_resolution(resolution, num_classes):
    g, d = _small(resolution, num_classes)
    z = torch.randn(2, 16)
    y = torch.tensor([0, 4]) if num_classes else None
    img = g(z, y)
    assert img.shape == (2, 3, resolution, resolution)
    with torch.no_grad():  # push the last conv's output far outside [-1, 1]: tanh must still bound the images
        g.out_conv.bias.fill_(20.0)
    assert (g(z, y).abs() <= 1.0).all() and g(z, y).min() > 0.99
    assert d(img, y).shape == (2,)
    # the paper's placement: attention after the 32x32 stage (16x16 for 32x32 images) in both networks
    expected = {32: [16], 64: [32], 128: [32]}[resolution]
    assert list(attention_layers(g)) == expected
    assert list(attention_layers(d)) == expected


def test_grayscale_and_custom_widths_and_attention():
    g = Generator(32, z_dim=16, ch=8, ch_mult=[4, 2, 2, 1], attn_resolutions=[8, 32], num_classes=3, img_channels=1)
    d = Discriminator(32, ch=8, ch_mult=[1, 2, 2], attn_resolutions=[16, 8], num_classes=3, img_channels=1)
    y = torch.tensor([0, 2])
    img, maps = g(torch.randn(2, 16), y, return_attention=True)
    assert img.shape == (2, 1, 32, 32)
    assert set(maps) == {8, 32} and maps[32].shape == (2, 32 * 32, 16 * 16)
    assert d(img, y).shape == (2,)
    assert sorted(attention_layers(d)) == [8, 16]


def test_every_conv_linear_embedding_is_spectrally_normalised():
    """Every conv, linear and embedding of G and D; the only exception is conditional BN's per-class gain and bias
    in G, which are BatchNorm's affine parameters indexed by class (official SAGAN code; ``cbn_sn`` adds SN)."""
    from sagan.layers import ConditionalBatchNorm2d

    for net in _small(64, 10):
        cbn_tables = {id(m) for c in net.modules() if isinstance(c, ConditionalBatchNorm2d) for m in (c.gain, c.bias)}
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert layers
        for m in layers:
            assert parametrize.is_parametrized(m, "weight") != (id(m) in cbn_tables), m
    g = Generator(32, z_dim=16, ch=8, num_classes=10, cbn_sn=True)
    assert all(parametrize.is_parametrized(m, "weight") for m in g.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)))


def test_all_weights_have_unit_spectral_norm_after_power_iteration():
    g, d = _small(32, 10)
    for net in (g, d):
        refresh_spectral_norm(net, n_iterations=60)
        net.eval()
        checked = 0
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)) and parametrize.is_parametrized(m, "weight"):
                w = m.weight.detach().reshape(m.weight.shape[0], -1)
                assert abs(float(torch.linalg.matrix_norm(w, ord=2)) - 1.0) < 2e-2
                checked += 1
        assert checked >= 10


def test_conditional_models_need_labels():
    g, d = _small(32, 10)
    with pytest.raises(ValueError, match="class-conditional"):
        g(torch.randn(2, 16))
    with pytest.raises(ValueError, match="class-conditional"):
        d(torch.randn(2, 3, 32, 32))


def test_labels_change_conditional_outputs():
    from sagan.layers import ConditionalBatchNorm2d

    g, d = _small(32, 10)
    g.eval()
    z = torch.randn(1, 16).repeat(2, 1)
    img = g(z, torch.tensor([1, 7]))
    torch.testing.assert_close(img[0], img[1])  # official init: every class starts with gain 1, bias 0
    with torch.no_grad():  # as training makes them: per-class gains and biases
        for m in g.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.gain.weight.add_(0.1 * torch.randn_like(m.gain.weight))
                m.bias.weight.add_(0.1 * torch.randn_like(m.bias.weight))
    img = g(z, torch.tensor([1, 7]))
    assert not torch.allclose(img[0], img[1])
    x = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    out = d(x, torch.tensor([1, 7]))
    assert out[0] != out[1]


def test_eval_generator_is_independent_of_batch_size():
    g, _ = _small(32, 10)
    g.eval()
    z = torch.randn(7, 16)
    y = torch.arange(7)
    full = g(z, y)
    singles = torch.cat([g(z[i : i + 1], y[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resolution", [16, 48, 256])
def test_unsupported_resolution_is_a_clear_error(resolution):
    with pytest.raises(ConfigError, match=r"resolution .* not supported.*\[32, 64, 128\]"):
        Generator(resolution)
    with pytest.raises(ConfigError, match="not supported"):
        Discriminator(resolution)


def test_unreachable_attention_resolution_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"attention resolution\(s\) \[64\]"):
        Generator(32, attn_resolutions=[64])
    with pytest.raises(ConfigError, match=r"\[32\] do not occur"):
        Discriminator(32, attn_resolutions=[32])
    with pytest.raises(ConfigError, match="ch_mult"):
        Generator(32, ch_mult=[4, 4])


def test_attention_blocks_start_at_gamma_zero():
    g, d = _small(64, 0)
    blocks = [m for m in [*g.modules(), *d.modules()] if isinstance(m, SelfAttention2d)]
    assert len(blocks) == 2 and all(float(b.gamma) == 0.0 for b in blocks)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_hierarchical_latent_feeds_each_block_its_own_chunk_of_z(num_classes):
    """skip_z (BigGAN): the 4x4 input sees the first chunk of z only, and chunk k+1 reaches the image through
    block k's BatchNorm gains and biases."""
    torch.manual_seed(0)
    g = Generator(32, z_dim=18, ch=8, num_classes=num_classes, skip_z=True).eval()
    assert g.z_chunks == [6, 4, 4, 4] and g.linear.in_features == 6
    y = torch.tensor([1, 7]) if num_classes else None
    z = torch.randn(2, 18, requires_grad=True)
    (grad,) = torch.autograd.grad(g(z, y).square().sum(), z)
    for chunk in torch.split(grad, g.z_chunks, dim=1):
        assert chunk.abs().sum() > 0  # every chunk matters
    # silence block 1's latent maps: chunk 2 no longer reaches the image, the others still do
    silence = [m.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
               for bn in (g.blocks[1].bn1, g.blocks[1].bn2) for m in (bn.z_gain, bn.z_bias)]
    (grad,) = torch.autograd.grad(g(z, y).square().sum(), z)
    chunks = torch.split(grad, g.z_chunks, dim=1)
    assert chunks[2].abs().sum() == 0 and all(chunks[i].abs().sum() > 0 for i in (0, 1, 3))
    for h in silence:
        h.remove()
    # its latent maps are spectrally normalised like every other linear layer
    assert all(parametrize.is_parametrized(m, "weight") for m in g.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ConfigError, match="skip_z.*z_dim >= 4"):
        Generator(32, z_dim=3, ch=8, skip_z=True)


def test_minibatch_stddev_is_per_group_of_consecutive_samples():
    """ProGAN's minibatch stddev: one extra channel, constant over positions, the same for every member of a group
    of consecutive samples, near 0 for a group of copies, and blind to samples outside the group (so a batch laid
    out as cat([real, fake]) never mixes the two)."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4)
    x[4:] = x[4]  # the second group: four copies
    out = minibatch_stddev(x, 4)
    assert out.shape == (8, 6, 4, 4) and torch.equal(out[:, :5], x)
    stat = out[:, 5]
    assert torch.all(stat == stat[:, :1, :1])  # constant over positions
    assert torch.all(stat[:4] == stat[0]) and stat[0, 0, 0] > 0.5  # one value per group
    assert torch.all(stat[4:] < 1e-3)  # copies have no spread
    changed = x.clone()
    changed[6] += 1.0  # change a sample of the second group only
    again = minibatch_stddev(changed, 4)[:, 5]
    assert torch.equal(again[:4], stat[:4]) and again[4, 0, 0] > 0.1
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        minibatch_stddev(x[:6], 4)


def test_discriminator_with_minibatch_stddev_sees_its_group():
    torch.manual_seed(0)
    d = Discriminator(32, ch=8, mbstd_group=2).eval()
    assert d.blocks[-1].conv1.in_channels == d.blocks[-2].conv2.out_channels + 1
    x = torch.randn(4, 3, 32, 32)
    logits = d(x)
    moved = x.clone()
    moved[1] += 0.5  # the partner of sample 0 in its group of two
    again = d(moved)
    assert again[0] != logits[0]  # sample 0's logit depends on its partner ...
    assert torch.equal(again[2:], logits[2:])  # ... and the other group's do not
    with pytest.raises(ConfigError, match="mbstd_group must be >= 0"):
        Discriminator(32, ch=8, mbstd_group=-1)
