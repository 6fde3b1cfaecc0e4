"""Building blocks of SAGAN (Zhang et al., "Self-Attention Generative Adversarial Networks", arXiv 1805.08318).

* spectral-norm factories for conv / linear / embedding (Miyato et al., arXiv 1802.05957), built on
  ``torch.nn.utils.parametrizations.spectral_norm``;
* :class:`SelfAttention2d`, the non-local block of SAGAN section 3 as in the official code
  (``sn_non_local_block_sim``): 1x1 SN convs, 2x2 max-pooled keys/values, ``y = gamma * o + x``;
* :class:`ConditionalBatchNorm2d`, class-conditional BN for the generator (de Vries et al. 2017; Miyato & Koyama 2018).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

SN_EPS = 1e-6


class SpectralNormFP32(_SpectralNorm):
    """``torch.nn.utils.parametrizations``' spectral norm with its power iteration and sigma in float32 always.

    Under CUDA autocast the matrix-vector products of torch's implementation run in bfloat16 / float16, which
    gives sigma to about three digits and rescales every layer by that error at every step. Here they run with
    autocast off, on the float32 weight; the normalised weight is float32 and autocast casts it for the conv /
    linear that uses it, as it would any float32 weight.
    """

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return super().forward(weight.float())


def spectral_norm(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """Register :class:`SpectralNormFP32` on ``module.weight`` (one power iteration per training forward)."""
    parametrize.register_parametrization(module, "weight", SpectralNormFP32(module.weight, 1, 0, eps))
    return module


def sn_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = True,
) -> nn.Module:
    """A ``nn.Conv2d`` whose weight is spectrally normalised (Miyato et al. 2018) by torch's parametrisation: one
    power iteration per forward in training mode, none in eval mode; sigma in float32 also under autocast
    (:class:`SpectralNormFP32`)."""
    if padding is None:
        padding = kernel_size // 2
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    nn.init.xavier_uniform_(conv.weight)
    if bias:
        nn.init.zeros_(conv.bias)
    return spectral_norm(conv)


def sn_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A ``nn.Linear`` whose weight is spectrally normalised."""
    lin = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return spectral_norm(lin)


def sn_embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """A ``nn.Embedding`` whose (num_embeddings, embedding_dim) table is spectrally normalised."""
    emb = nn.Embedding(num_embeddings, embedding_dim)
    nn.init.xavier_uniform_(emb.weight)
    return spectral_norm(emb)


def spectral_norm_modules(module: nn.Module) -> list[nn.Module]:
    """Every submodule whose ``weight`` is spectrally normalised through ``torch.nn.utils.parametrizations``."""
    out = []
    for m in module.modules():
        plist = getattr(getattr(m, "parametrizations", None), "weight", None)
        if plist is not None and any(isinstance(p, _SpectralNorm) for p in plist):
            out.append(m)
    return out


@torch.no_grad()
def refresh_spectral_norm(module: nn.Module, n_iterations: int = 1) -> None:
    """Run ``n_iterations`` power iterations on every SN weight of ``module``, whatever its train/eval mode.

    Used for the EMA generator: after each averaging step its own singular-vector estimates (``_u``, ``_v``
    buffers) take one power iteration against the averaged weights, as G's take one per training forward. This is
    the power method of the parametrisation's training-mode forward, without the normalised weight that forward
    also computes (a third of its operations).
    """
    for m in spectral_norm_modules(module):
        plist = m.parametrizations.weight
        for p in plist:
            if isinstance(p, _SpectralNorm) and len(plist) == 1 and hasattr(p, "_power_method"):
                p._power_method(p._reshape_weight_to_matrix(plist.original), n_iterations)
            else:  # chained parametrisations, or a torch without the method: the public path
                was_training = p.training
                p.train()
                for _ in range(n_iterations):
                    _ = m.weight  # training-mode parametrisation forward updates _u and _v in place
                p.train(was_training)


def minibatch_stddev(x: Tensor, group: int) -> Tensor:
    """Minibatch standard deviation (Karras et al. 2018, ProGAN, section 3): one more channel holding, for each
    group of ``group`` consecutive samples, the standard deviation of every feature over the group, averaged over
    features and positions. A discriminator that sees it can tell a batch of near-copies from a varied one, which
    pushes the generator to cover more of the data (against mode dropping in unconditional models).

    Groups are consecutive samples (not strided as in StyleGAN), so a batch laid out as ``cat([real, fake])`` with
    each half a multiple of ``group`` never mixes real and generated images in one group.
    (B, C, H, W) -> (B, C + 1, H, W).
    """
    b, c, h, w = x.shape
    if b % group:
        raise ValueError(f"minibatch stddev: the batch of {b} is not a multiple of the group size {group}")
    grouped = x.reshape(b // group, group, c, h, w)  # (B/G, G, C, H, W)
    std = (grouped.float().var(dim=1, unbiased=False) + 1e-8).sqrt()  # (B/G, C, H, W)
    stat = std.mean(dim=(1, 2, 3)).to(x.dtype).repeat_interleave(group)  # (B,)
    return torch.cat([x, stat.view(b, 1, 1, 1).expand(b, 1, h, w)], dim=1)


class SelfAttention2d(nn.Module):
    """SAGAN self-attention block (Zhang et al. 2019, section 3; official ``sn_non_local_block_sim``).

    For x of shape (B, C, H, W) and N = H*W positions::

        f = W_f x   (query, C/8)      g = W_g x   (key, C/8)      h = W_h x   (value, C/2)
        beta = softmax_keys(f^T g)    (B, N, N_key)               o = W_v (h beta^T)   (back to C)
        y = gamma * o + x             gamma a learned scalar initialised to 0

    All four 1x1 convs are spectrally normalised and bias-free (as in the official code); with ``pool=True``
    (default, official) keys and values are 2x2 max-pooled, so N_key = N/4. Unlike transformer attention the
    logits are *not* scaled by 1/sqrt(d). The default path calls ``F.scaled_dot_product_attention`` (with
    ``scale=1``), which never materialises the N x N map; ``return_attention=True`` uses the explicit path and also
    returns the map for visualisation.
    """

    def __init__(self, channels: int, pool: bool = True, use_sdpa: bool = True) -> None:
        super().__init__()
        if channels < 8 or channels % 8 != 0:
            raise ValueError(f"SelfAttention2d needs channels divisible by 8 (C/8 query/key), got {channels}")
        self.channels = channels
        self.pool = pool
        self.use_sdpa = use_sdpa
        self.query = sn_conv2d(channels, channels // 8, 1, bias=False)  # f
        self.key = sn_conv2d(channels, channels // 8, 1, bias=False)  # g
        self.value = sn_conv2d(channels, channels // 2, 1, bias=False)  # h
        self.out = sn_conv2d(channels // 2, channels, 1, bias=False)  # v
        self.gamma = nn.Parameter(torch.zeros(()))

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        k = self.key(x)
        v = self.value(x)
        if self.pool:
            if h % 2 or w % 2:
                raise ValueError(f"SelfAttention2d(pool=True) needs even H and W, got {h}x{w}")
            k = F.max_pool2d(k, 2)
            v = F.max_pool2d(v, 2)
        k = k.flatten(2).transpose(1, 2)  # (B, N_key, C/8)
        v = v.flatten(2).transpose(1, 2).contiguous()  # (B, N_key, C/2); fused SDPA kernels want unit last stride
        return q, k, v

    def attention_map(self, x: Tensor) -> Tensor:
        """The attention map beta of shape (B, N_query, N_key); each row sums to 1 over keys."""
        q, k, _ = self._qkv(x)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (B, N, N_key)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        q, k, v = self._qkv(x)
        attn = None
        if return_attention or not self.use_sdpa:
            attn = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (B, N, N_key)
            o = attn @ v  # (B, N, C/2)
        else:
            # Fused kernels (flash / memory-efficient) need one head size for q, k and v; zero-padding q and k from
            # C/8 to v's C/2 leaves every logit q.k unchanged and lets SDPA pick them instead of its math fallback,
            # which would build the N x N_key map (BENCHMARKS.md, attention table: 2.4x faster, 0.21x the peak
            # memory at a 64x64 feature map, batch 16, on a CPU; tests/test_fast_paths.py checks the kernel choice).
            pad = v.shape[-1] - q.shape[-1]
            qp, kp = (F.pad(q, (0, pad)), F.pad(k, (0, pad))) if pad > 0 else (q, k)  # (B, N, C/2), (B, N_key, C/2)
            # (B, 1, N, d): one head; scale=1 because SAGAN does not scale the logits.
            o = F.scaled_dot_product_attention(qp.unsqueeze(1), kp.unsqueeze(1), v.unsqueeze(1), scale=1.0)
            o = o.squeeze(1)  # (B, N, C/2)
        o = o.transpose(1, 2).reshape(b, c // 2, h, w)  # (B, C/2, H, W)
        y = torch.addcmul(x, self.gamma, self.out(o))  # x + gamma * o, without a separate gamma * o tensor
        if return_attention:
            return y, attn
        return y


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional BatchNorm (de Vries et al. 2017; Miyato & Koyama 2018): ``BN(x) * gain[y] + bias[y]``.

    The normalisation itself has no affine parameters; each class has its own gain and bias vector.

    * ``sn=False`` (default, the official SAGAN code's ``ops.ConditionalBatchNorm``): per-class gain and
      bias tables initialised to 1 and 0, so every class starts as plain BN, and free to grow like BN's own affine
      parameters (which spectral norm never touches).
    * ``sn=True`` (StudioGAN's SAGAN): ``gain = 1 + E_g[y]``, ``bias = E_b[y]`` with spectrally normalised,
      Xavier-initialised embeddings. Spectral norm pins the largest singular value of each table to 1, so the class
      signal can never grow beyond that; on small data this starves the class signal and the generator learns to
      suppress z instead (see BENCHMARKS.md, "Learning quality"), which is why it is not the default.

    With ``num_classes == 0`` it is an ordinary affine ``BatchNorm2d`` and ``y`` is ignored.

    ``z_dim > 0`` (BigGAN's hierarchical latent, Brock et al. 2019, section 4): a chunk of the latent ``z`` (B, z_dim)
    also shifts the gain and bias, through spectrally normalised linear maps: ``gain + W_g z``, ``bias + W_b z``.
    """

    def __init__(self, num_features: int, num_classes: int = 0, momentum: float = 0.1, eps: float = 1e-5,
                 sn: bool = False, z_dim: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.sn = sn
        self.bn = nn.BatchNorm2d(num_features, affine=num_classes == 0, momentum=momentum, eps=eps)
        if z_dim > 0:
            self.z_gain = sn_linear(z_dim, num_features, bias=False)
            self.z_bias = sn_linear(z_dim, num_features, bias=False)
        if num_classes > 0:
            if sn:
                self.gain = sn_embedding(num_classes, num_features)
                self.bias = sn_embedding(num_classes, num_features)
            else:
                self.gain = nn.Embedding(num_classes, num_features)
                self.bias = nn.Embedding(num_classes, num_features)
                nn.init.ones_(self.gain.weight)
                nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor | None = None, strength: float = 1.0, z: Tensor | None = None) -> Tensor:
        """``y``: class indices (B,), or class weights (B, num_classes) that mix the class embeddings (used to
        interpolate between classes; a one-hot row equals its index). ``strength`` in [0, 1] scales the class
        signal: the gain's departure from 1 and the bias (0 = plain BN for every class; 1 = full conditioning).
        ``z``: the latent chunk (B, z_dim) of a hierarchical-latent generator (needed when built with ``z_dim``)."""
        out = self.bn(x)
        if hasattr(self, "z_gain"):
            if z is None:
                raise ValueError("ConditionalBatchNorm2d with a hierarchical latent (z_dim > 0) needs its chunk z")
            z_gain, z_bias = self.z_gain(z), self.z_bias(z)  # (B, C) each
        else:
            z_gain = z_bias = None
        if self.num_classes == 0:
            return out if z_gain is None else out * (1.0 + z_gain[:, :, None, None]) + z_bias[:, :, None, None]
        if y is None:
            raise ValueError("ConditionalBatchNorm2d of a class-conditional model needs class labels y")
        if y.is_floating_point():
            gain = y @ self.gain.weight  # (B, K) @ (K, C) -> (B, C)
            bias = y @ self.bias.weight
        else:
            gain = self.gain(y)  # (B, C)
            bias = self.bias(y)
        if strength != 1.0:
            gain, bias = (gain if self.sn else gain - 1.0) * strength + (0.0 if self.sn else 1.0), bias * strength
        if self.sn:
            gain = 1.0 + gain
        if z_gain is not None:
            gain, bias = gain + z_gain, bias + z_bias
        return out * gain[:, :, None, None] + bias[:, :, None, None]
