import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sagan.layers import (
    ConditionalBatchNorm2d,
    SelfAttention2d,
    refresh_spectral_norm,
    sn_conv2d,
    sn_embedding,
    sn_linear,
)


def _attn(channels: int = 32, pool: bool = True, gamma: float = 0.0) -> SelfAttention2d:
    torch.manual_seed(0)
    m = SelfAttention2d(channels, pool=pool).eval()
    with torch.no_grad():
        m.gamma.fill_(gamma)
    return m


@pytest.mark.parametrize("pool", [True, False])
def test_attention_is_identity_at_gamma_zero(pool):
    torch.manual_seed(0)
    m = SelfAttention2d(32, pool=pool).eval()  # as constructed: nothing set by the test
    assert m.gamma.shape == () and float(m.gamma.detach()) == 0.0, "gamma must be initialised to 0"
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(m(x), x)
    y, _ = m(x, return_attention=True)
    assert torch.equal(y, x)


@pytest.mark.parametrize("pool", [True, False])
def test_sdpa_and_explicit_paths_agree(pool):
    m = _attn(pool=pool, gamma=0.7)
    x = torch.randn(3, 32, 16, 16)
    y_sdpa = m(x)
    y_explicit, attn = m(x, return_attention=True)
    torch.testing.assert_close(y_sdpa, y_explicit, atol=1e-5, rtol=1e-5)
    n_key = 16 * 16 // 4 if pool else 16 * 16
    assert attn.shape == (3, 16 * 16, n_key)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 256), atol=1e-5, rtol=0)
    m.use_sdpa = False
    torch.testing.assert_close(m(x), y_sdpa, atol=1e-5, rtol=1e-5)


def _paper_reference(m: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """SAGAN section 3 written out in float64 with explicit loops over the equations' indices as matrices."""
    x = x.double()
    b, c, h, w = x.shape
    wf = m.query.weight.double().reshape(c // 8, c)  # W_f
    wg = m.key.weight.double().reshape(c // 8, c)  # W_g
    wh = m.value.weight.double().reshape(c // 2, c)  # W_h
    wv = m.out.weight.double().reshape(c, c // 2)  # W_v
    out = torch.empty_like(x)
    for i in range(b):
        xi = x[i].reshape(c, h * w)  # (C, N)
        f = wf @ xi  # (C/8, N)
        g = (wg @ xi).reshape(c // 8, h, w)
        hh = (wh @ xi).reshape(c // 2, h, w)
        if m.pool:
            g, hh = F.max_pool2d(g[None], 2)[0], F.max_pool2d(hh[None], 2)[0]
        g, hh = g.reshape(c // 8, -1), hh.reshape(c // 2, -1)  # (C/8, Nk), (C/2, Nk)
        s = f.T @ g  # s_ij = f(x_i)^T g(x_j): (N, Nk)
        beta = torch.exp(s - s.max(1, keepdim=True).values)
        beta = beta / beta.sum(1, keepdim=True)  # beta_{j,i}: softmax over keys
        o = wv @ (hh @ beta.T)  # o_j = v(sum_i beta_{j,i} h(x_i)): (C, N)
        out[i] = (m.gamma.double() * o).reshape(c, h, w) + x[i]
    return out


@pytest.mark.parametrize("pool", [True, False])
def test_attention_matches_float64_paper_reference(pool):
    m = _attn(pool=pool, gamma=-1.3)
    x = torch.randn(2, 32, 8, 8)
    ref = _paper_reference(m, x)
    assert not torch.allclose(ref, x.double())  # gamma != 0 really changes the output
    torch.testing.assert_close(m(x).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, return_attention=True)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_gradients_reach_gamma_from_zero_then_every_conv():
    x = torch.randn(2, 32, 8, 8)
    convs = ("query", "key", "value", "out")
    m = _attn(gamma=0.0).train()
    m(x).square().sum().backward()
    assert m.gamma.grad is not None and m.gamma.grad.abs() > 0  # gamma learns even from 0 ...
    for name in convs:  # ... while y does not depend on the convs yet
        assert getattr(m, name).parametrizations.weight.original.grad.abs().sum() == 0, name
    m = _attn(gamma=0.5).train()  # once gamma moves, every 1x1 conv of the block learns
    m(x).square().sum().backward()
    for name in convs:
        g = getattr(m, name).parametrizations.weight.original.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_attention_rejects_bad_channels():
    with pytest.raises(ValueError, match="divisible by 8"):
        SelfAttention2d(12)


@pytest.mark.parametrize(
    "make",
    [lambda: sn_conv2d(16, 32, 3), lambda: sn_linear(40, 24), lambda: sn_embedding(10, 48), lambda: sn_conv2d(8, 64, 1)],
)
def test_spectral_norm_keeps_largest_singular_value_near_one(make):
    torch.manual_seed(0)
    m = make()
    with torch.no_grad():  # make the raw weight's spectral norm far from 1
        m.parametrizations.weight.original.mul_(7.0)
    refresh_spectral_norm(m, n_iterations=100)
    m.eval()
    w = m.weight.reshape(m.weight.shape[0], -1)
    sigma = torch.linalg.matrix_norm(w, ord=2)
    assert abs(float(sigma) - 1.0) < 1e-3


def test_spectral_norm_converges_through_training_forwards():
    torch.manual_seed(0)
    conv = sn_conv2d(8, 16, 3).train()
    x = torch.randn(1, 8, 6, 6)
    for _ in range(50):  # one power iteration per training forward
        conv(x)
    sigma = torch.linalg.matrix_norm(conv.weight.reshape(16, -1), ord=2)
    assert abs(float(sigma) - 1.0) < 1e-2


def test_conditional_batchnorm_starts_as_plain_bn_and_learns_per_class():
    """Official SAGAN init: every class's gain is 1 and bias 0, so at the start CBN equals parameter-free BN."""
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(8, num_classes=4).train()
    x = torch.randn(6, 8, 5, 5)
    plain = F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    for c in range(4):
        torch.testing.assert_close(cbn(x, torch.full((6,), c, dtype=torch.long)), plain)
    assert not any(parametrize.is_parametrized(m) for m in (cbn.gain, cbn.bias))  # BN's affine: no spectral norm
    with torch.no_grad():  # what training does: classes get their own gain and bias
        cbn.gain.weight[3].mul_(2.0)
        cbn.bias.weight[3].add_(0.5)
    out0, out3 = cbn(x, torch.zeros(6, dtype=torch.long)), cbn(x, torch.full((6,), 3, dtype=torch.long))
    torch.testing.assert_close(out3, plain * 2.0 + 0.5)
    torch.testing.assert_close(out0, plain)
    # class weights mix the tables: a one-hot row equals its index
    onehot = F.one_hot(torch.full((6,), 3), 4).float()
    torch.testing.assert_close(cbn(x, onehot), out3)
    with pytest.raises(ValueError, match="class labels"):
        cbn(x)
    unconditional = ConditionalBatchNorm2d(8, num_classes=0)
    assert isinstance(unconditional.bn, nn.BatchNorm2d) and unconditional.bn.affine
    torch.testing.assert_close(unconditional(x), unconditional.bn(x))


def test_conditional_batchnorm_with_spectrally_normalised_embeddings():
    """StudioGAN's variant: gain 1 + SN(E_g)[y], bias SN(E_b)[y]; the tables' largest singular value is 1."""
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(8, num_classes=4, sn=True).train()
    assert parametrize.is_parametrized(cbn.gain) and parametrize.is_parametrized(cbn.bias)
    x = torch.randn(6, 8, 5, 5)
    out_a, out_b = cbn(x, torch.zeros(6, dtype=torch.long)), cbn(x, torch.full((6,), 3, dtype=torch.long))
    assert not torch.allclose(out_a, out_b)  # Xavier-initialised tables: classes differ from the start
    refresh_spectral_norm(cbn, n_iterations=50)
    cbn.eval()
    assert abs(float(torch.linalg.matrix_norm(cbn.bias.weight, ord=2)) - 1.0) < 1e-3
