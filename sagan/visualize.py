"""Pictures of SAGAN's attention: where does a query position look? (cf. SAGAN paper, figures 1 and 5).

For a generated image and a query position, the attention row beta_{j, :} over the (pooled) key grid is upsampled
to the image, drawn as a heat map over the image, and the query position is marked. Plain PIL, no plotting library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from .errors import ConfigError

MAX_QUERY_POINTS = 64  # one panel each: more is a figure nobody reads (and 10^5 of them a run that never ends)
QUERY_COLOURS = [(255, 64, 64), (64, 200, 255), (120, 255, 80), (255, 210, 0), (230, 90, 255), (255, 140, 0)]


def check_query_points(n: int, what: str) -> None:
    """Query points per attention figure must be 1..:data:`MAX_QUERY_POINTS`; ``what`` names the setting."""
    if not 1 <= n <= MAX_QUERY_POINTS:
        raise ConfigError(f"{what} must be between 1 and {MAX_QUERY_POINTS} (one panel of the figure each), got {n}")


def default_query_points(n: int) -> list[tuple[float, float]]:
    """n query positions (y, x) as fractions of the image, spread over its middle."""
    base = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7), (0.5, 0.5), (0.15, 0.5), (0.85, 0.5), (0.5, 0.15)]
    if n <= len(base):
        return base[:n]
    k = math.ceil(math.sqrt(n))
    return [((i // k + 0.5) / k, (i % k + 0.5) / k) for i in range(n)]


def heat_rgb(m: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) colours from black through red and yellow to white."""
    r = (m * 3).clamp(0, 1)
    g = (m * 3 - 1).clamp(0, 1)
    b = (m * 3 - 2).clamp(0, 1)
    return torch.stack([r, g, b])


def query_map(attn: Tensor, feat_hw: tuple[int, int], point: tuple[float, float], out_size: int) -> tuple[Tensor, int]:
    """Attention of one query over the keys, as an (out_size, out_size) map in [0, 1] (max-normalised).

    ``attn`` is one image's map (N_query, N_key) at feature size ``feat_hw``; keys form an (h, w) or pooled
    (h/2, w/2) grid. Returns the map and the query's flat index.
    """
    h, w = feat_hw
    qy, qx = min(int(point[0] * h), h - 1), min(int(point[1] * w), w - 1)
    q = qy * w + qx
    n_key = attn.shape[-1]
    kh = kw = int(math.isqrt(n_key))
    if kh * kw != n_key:  # non-square maps: keys on the feature grid pooled by the same factor
        f = int(math.isqrt(h * w // n_key))
        kh, kw = h // f, w // f
    m = attn[q].reshape(1, 1, kh, kw).float()
    m = F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=False)[0, 0]
    return m / m.max().clamp_min(1e-12), q


def to_rgb01(img: Tensor) -> Tensor:
    """(C, H, W) in [-1, 1] -> (3, H, W) in [0, 1]."""
    x = (img.detach().float().clamp(-1, 1) + 1) / 2
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def _pil(x: Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def attention_figure(
    image: Tensor, maps: dict[int, Tensor], points: list[tuple[float, float]] | None = None, panel: int = 128
) -> Image.Image:
    """One row per attention layer: the image with the query points marked, then one panel per query point with
    that point's attention over the image (heat map blended over the grayscale image, point marked).

    ``image``: (C, H, W) in [-1, 1]; ``maps``: {feature resolution: (N_query, N_key) map of this image}.
    """
    points = points or default_query_points(4)
    rgb = F.interpolate(to_rgb01(image)[None], size=(panel, panel), mode="nearest")[0]
    gray = rgb.mean(0, keepdim=True).expand(3, -1, -1)
    rows = []
    for res in sorted(maps):
        panels = []
        base = _pil(rgb)
        draw = ImageDraw.Draw(base)
        snapped = [_snap(p, res) for p in points]
        for i, p in enumerate(snapped):
            _mark(draw, p, panel, QUERY_COLOURS[i % len(QUERY_COLOURS)])
        draw.text((3, 2), f"{res}x{res}", fill=(255, 255, 255))
        panels.append(base)
        for i, p in enumerate(points):
            m, _ = query_map(maps[res], (res, res), p, panel)
            over = _pil(0.45 * gray + 0.55 * heat_rgb(m))
            _mark(ImageDraw.Draw(over), snapped[i], panel, QUERY_COLOURS[i % len(QUERY_COLOURS)])
            panels.append(over)
        rows.append(panels)
    pad = 4
    width = len(rows[0]) * (panel + pad) + pad
    height = len(rows) * (panel + pad) + pad
    fig = Image.new("RGB", (width, height), (30, 30, 30))
    for r, panels in enumerate(rows):
        for c, im in enumerate(panels):
            fig.paste(im, (pad + c * (panel + pad), pad + r * (panel + pad)))
    return fig


def _snap(p: tuple[float, float], res: int) -> tuple[float, float]:
    """The centre of the feature cell a query point falls in, as fractions of the image."""
    return ((min(int(p[0] * res), res - 1) + 0.5) / res, (min(int(p[1] * res), res - 1) + 0.5) / res)


def _mark(draw: ImageDraw.ImageDraw, p: tuple[float, float], size: int, colour: tuple[int, int, int]) -> None:
    y, x = p[0] * size, p[1] * size
    r = max(3, size // 32)
    draw.rectangle([x - r, y - r, x + r, y + r], outline=colour, width=2)
