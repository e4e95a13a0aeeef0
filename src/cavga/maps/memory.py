"""Nearest-neighbour maps on a memory of normal features, in the manner of PatchCore, and the
whole-image nearest neighbour.

- `memory`: patch features of the normal training images at the chosen stages (each position's
  neighbourhood averaged, stages resized to the finest one and concatenated, with local texture
  statistics of the image beside them), thinned by a seeded greedy coreset; the map is each
  position's distance to its nearest kept feature.
- `nearest-image`: the whole image, standardised, against every normal training image; the map is
  |x − nearest| and the image score the distance.
- `ImageMemory`: a whole-image embedding (standardised pixels, pooled features and histograms of
  oriented gradients) of every training image, whose nearest-neighbour distance is the whole-image
  score fused with a map's peak.

Distances are computed in chunks so memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cavga.attention import upsample
from cavga.config import TrainConfig
from cavga.maps.common import available_layers, blur, join, layer
from cavga.maps.registry import Fitter, MapContext, MapSpec, register_map
from cavga.networks import CAVGA, ModelOutput
from cavga.networks.anchor import standardize

CHUNK_ELEMENTS = 1 << 22  # distances held at once in `nearest_distance` (16 MB; 64 MB was slower)
SQUARES_ELEMENTS = 1 << 20  # bank values widened and squared at once in `nearest_distance` (4 MB)
# Bank blocks of `nearest_distance` have a multiple of this many rows: a product whose output rows
# have an odd length (a block of 2,647 or 1,353 rows) ran at half the rate of one of 2,624 or 2,000
# (docs/speed.md).
BLOCK_ALIGN = 16
# The whole-image banks hold every training image, so they are kept in half precision: half the
# memory and checkpoint size, and its rounding (about 5e-4 of each value) is far below the 8-bit
# quantisation of the images they come from.
BANK_DTYPE = torch.float16
NEAREST_IMAGE_SIZE = 64  # the nearest-image map compares images at most this size (pixels per side)
GLOBAL_PIXELS = 32  # the whole-image embedding's pixel part, at most this size per side
GLOBAL_GRID = 4  # the whole-image embedding pools each stage to GLOBAL_GRID × GLOBAL_GRID
ORIENTATIONS = 9  # unsigned orientation bins of the embedding's gradient histograms (Dalal & Triggs)
HYS_CLIP = 0.2  # L2-Hys: each normalised block value is clipped here, then the block normalised again
TEXTURE_EPS = 1e-3  # `local_texture`: added to the gradient energy of a cell (of a standardised image)
TEXTURE_CHANNELS = ORIENTATIONS + 3  # `local_texture`: orientation shares, log energy, mean, spread
POSITION_CHANNELS = 2  # `memory_input` with `memory_position`: each cell's row and column


def greedy_coreset(features: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Indices of `n` rows of `features` (N, D) chosen by greedy k-centre selection, and the radius:
    every row lies within that Euclidean distance of a kept one (the greedy choice is within twice
    the best possible radius). The first centre is drawn with `seed`; the rest follow deterministically.
    """
    N = len(features)
    if n >= N:
        return torch.arange(N), 0.0
    first = int(torch.randint(N, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = first
    sq = features.pow(2).sum(1)
    # One row times every row, n times: with the rows as columns of a (D, N) matrix this product
    # streams memory in order, about 3× faster on a CPU than (N, D) @ row.
    columns = features.T.contiguous()

    def squared_distances(i: int) -> torch.Tensor:
        d = features[i] @ columns
        return d.mul_(-2).add_(sq).add_(sq[i]).clamp_min_(0)

    # Squared distance of every row to its nearest chosen centre, updated as centres are added.
    nearest = squared_distances(first)
    for i in range(1, n):
        nxt = int(nearest.argmax())
        chosen[i] = nxt
        torch.minimum(nearest, squared_distances(nxt), out=nearest)
    return chosen, float(nearest.max().sqrt())


def nearest_distance(query: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (Q,) from each query row (Q, D) to its nearest bank row (M, D), and that row's index.

    The bank may be stored in half precision (`BANK_DTYPE`); it is widened a block of rows at a time,
    so no full-precision copy of it is ever made. The nearest row is found with the fast
    |q|² − 2 q·b + |b|² form, whose cancellation costs about 1e-4 of relative precision; its distance
    is then computed exactly as |q − b|, so PyTorch and an exported graph agree to float rounding.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    query = query.to(dtype)
    if torch.onnx.is_in_onnx_export():
        # An exported graph has a dynamic batch, so no Python loop over chunks: all Q × M at once.
        wide = bank.to(dtype)
        index = (wide.pow(2).sum(1) - 2 * query @ wide.T).argmin(1)
    else:
        # A block of bank rows at a time (|q|² is the same for every row, so it is left out), each
        # query chunk's products updated in place: one buffer of a chunk's size, never the bank
        # squared or widened whole (a whole-image bank of 3,000 colour images is 74 MB).
        rows = _block_rows(len(bank), bank.shape[1])
        step = max(1, CHUNK_ELEMENTS // rows)
        best = torch.full((len(query),), torch.inf, dtype=dtype, device=query.device)
        index = torch.zeros(len(query), dtype=torch.long, device=query.device)
        for start in range(0, len(bank), rows):
            block = bank[start : start + rows].to(dtype)
            block_sq = block.pow(2).sum(1)
            pad = -len(block) % BLOCK_ALIGN
            if pad:  # zero rows at an infinite distance: never the nearest, but an aligned product
                block = F.pad(block, (0, 0, 0, pad))
                block_sq = F.pad(block_sq, (0, pad), value=torch.inf)
            for q, b, i in zip(query.split(step), best.split(step), index.split(step), strict=True):
                value, at = torch.addmm(block_sq, q, block.T, alpha=-2).min(1)
                closer = value < b  # strictly: a tie keeps the earlier row, as `argmin` does
                b[closer], i[closer] = value[closer], at[closer] + start
    return (query - bank[index].to(dtype)).norm(dim=1), index


def _block_rows(n: int, width: int) -> int:
    """Rows per bank block of `nearest_distance`: at most `SQUARES_ELEMENTS` values (but at least
    `BLOCK_ALIGN` rows), the bank split into blocks of equal size, rounded up to `BLOCK_ALIGN`."""
    most = max(BLOCK_ALIGN, SQUARES_ELEMENTS // max(1, width) // BLOCK_ALIGN * BLOCK_ALIGN)
    blocks = max(1, math.ceil(n / most))
    return max(1, math.ceil(math.ceil(n / blocks) / BLOCK_ALIGN)) * BLOCK_ALIGN


def orientation_votes(x: torch.Tensor, bins: int = ORIENTATIONS) -> torch.Tensor:
    """(B, bins, H, W): each pixel's gradient magnitude in the bin of its unsigned orientation, zero in
    the others. Central differences (zero on the border rows and columns), and for colour the channel
    with the largest gradient at each pixel, as `skimage.feature.hog` computes them."""
    rows = F.pad(x[:, :, 2:] - x[:, :, :-2], (0, 0, 1, 1))
    cols = F.pad(x[..., 2:] - x[..., :-2], (1, 1))
    magnitude = (rows * rows + cols * cols).sqrt()  # not torch.hypot: ONNX has no such operator
    # The strongest channel by comparisons, the first one on a tie as `argmax` (and scikit-image):
    # an argmax over the channel dimension took 5 % of an inference batch (docs/speed.md).
    strongest = (rows[:, :1], cols[:, :1], magnitude[:, :1])
    for c in range(1, x.shape[1]):
        stronger = magnitude[:, c : c + 1] > strongest[2]
        candidate = (rows[:, c : c + 1], cols[:, c : c + 1], magnitude[:, c : c + 1])
        strongest = tuple(torch.where(stronger, a, b) for a, b in zip(candidate, strongest, strict=True))
    rows, cols, magnitude = strongest
    angle = torch.remainder(torch.rad2deg(torch.atan2(rows, cols)), 180)[:, 0]
    which = torch.floor(angle * (bins / 180)).clamp(max=bins - 1).long()
    return F.one_hot(which, bins).permute(0, 3, 1, 2).to(x.dtype) * magnitude


def gradient_histograms(
    x: torch.Tensor, cells: int, bins: int = ORIENTATIONS, eps: float = 1e-5
) -> torch.Tensor:
    """(B, D) histograms of oriented gradients (HOG; Dalal & Triggs, CVPR 2005) of images (B, C, H, W)
    on a `cells` × `cells` grid: what `skimage.feature.hog` gives with `pixels_per_cell` = the side
    over `cells` (square images), `cells_per_block=(2, 2)` and its other defaults. That is, the votes
    of `orientation_votes`, each cell's mean per orientation, and blocks of 2 × 2 cells normalised
    with L2-Hys.

    Written in torch rather than called from scikit-image so that it runs in batches on the model's
    device and inside an exported ONNX graph; a test checks it against scikit-image."""
    h, w = x.shape[-2] // cells, x.shape[-1] // cells
    votes = orientation_votes(x, bins)[..., : h * cells, : w * cells]
    hist = F.avg_pool2d(votes, (h, w))  # (B, bins, cells, cells)
    n = cells - 1
    blocks = torch.stack([hist[:, :, r : r + n, c : c + n] for r in (0, 1) for c in (0, 1)], -1)
    blocks = blocks.permute(0, 2, 3, 4, 1).flatten(3)  # (B, n, n, 4·bins): cell-major, as scikit-image

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.sqrt(v.pow(2).sum(-1, keepdim=True) + eps**2)

    return unit(unit(blocks).clamp(max=HYS_CLIP)).flatten(1)


def memory_features(out: ModelOutput, cfg: TrainConfig) -> torch.Tensor:
    """(B, D, h, w): the memory stages, neighbourhood-averaged, at the finest stage's grid, stacked."""
    names = available_layers(out, cfg.memory_layers)
    feats = [layer(out, n, cfg.memory_pool) for n in names]
    grid = max(f.shape[-1] for f in feats)
    return torch.cat(
        [f if f.shape[-1] == grid else F.interpolate(f, size=grid, mode="bilinear") for f in feats], 1
    )


def local_texture(x: torch.Tensor, grid: int, pool: int) -> torch.Tensor:
    """(B, TEXTURE_CHANNELS, grid, grid): for each cell of a grid × grid division of the standardised
    image, over its pool × pool neighbourhood of cells, the share of the gradient energy in each
    orientation, the log of that energy, and the mean and standard deviation of the pixels.

    These are what a foreign piece of texture or a faded region changes (the demo's `patch` and
    `color` defects on grass and gravel), where random or briefly trained encoder features change
    little; see docs/method.md."""
    x = standardize(x.float())

    def pooled(t: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(t, grid)
        return F.avg_pool2d(cells, pool, stride=1, padding=pool // 2, count_include_pad=False)

    energy_by_orientation = pooled(orientation_votes(x))
    energy = energy_by_orientation.sum(1, keepdim=True)
    grey = x.mean(1, keepdim=True)
    mean = pooled(grey)
    spread = (pooled(grey * grey) - mean * mean).clamp_min(0).sqrt()
    log_energy = torch.log(energy + TEXTURE_EPS)
    return torch.cat([energy_by_orientation / (energy + TEXTURE_EPS), log_energy, mean, spread], 1)


def memory_input(x: torch.Tensor, out: ModelOutput, cfg: TrainConfig) -> torch.Tensor:
    """(B, D, h, w): `memory_features`, followed with `cfg.memory_texture` by the raw `local_texture`
    block on the same grid and with `cfg.memory_position` by each cell's row and column in [0, 1]
    (both scaled by `scale_extras` with the fitted state)."""
    f = memory_features(out, cfg)
    blocks = [f]
    if cfg.memory_texture:
        blocks.append(local_texture(x, f.shape[-1], cfg.memory_pool).to(f.dtype))
    if cfg.memory_position:
        B, _, h, w = f.shape
        rows = torch.linspace(0, 1, h, dtype=f.dtype, device=f.device).view(1, 1, h, 1).expand(B, 1, h, w)
        cols = torch.linspace(0, 1, w, dtype=f.dtype, device=f.device).view(1, 1, 1, w).expand(B, 1, h, w)
        blocks += [rows, cols]
    return torch.cat(blocks, 1) if len(blocks) > 1 else f


def scale_extras(f: torch.Tensor, state: dict) -> torch.Tensor:
    """Rows (N, D) of `memory_input` with the position block (the last 2 columns) scaled and the
    texture block (the columns before it) standardised per channel and scaled, as fitted; without
    either, unchanged."""
    texture, position = state.get("texture"), state.get("position")
    if not texture and not position:
        return f
    blocks = []
    if position:
        blocks.append(f[:, -POSITION_CHANNELS:] * position["scale"])
        f = f[:, :-POSITION_CHANNELS]
    if texture:
        width = len(texture["mean"])
        blocks.append((f[:, -width:] - texture["mean"].to(f)) / texture["std"].to(f) * texture["scale"])
        f = f[:, :-width]
    return torch.cat([f, *reversed(blocks)], 1)


class MemoryFitter(Fitter):
    """Up to `memory_candidates` training positions (an equal, seeded share per image), then the
    greedy coreset of `coreset_size` of them. With `memory_texture` the texture block is first
    standardised per channel over the candidates and scaled to `memory_texture` times the encoder
    features' root total variance (so its weight does not depend on the encoder's scale); with
    `memory_position` the position block is scaled so that a move across the whole image weighs
    `memory_position` times that root total variance per axis."""

    def __init__(self, model: CAVGA, cfg: TrainConfig, n_images: int):
        self.cfg, self.n_images = cfg, max(1, n_images)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.parts: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, out: ModelOutput) -> None:
        f = memory_input(x, out, self.cfg).float()
        B, D, h, w = f.shape
        flat = f.permute(0, 2, 3, 1).reshape(B, h * w, D).cpu()
        per_image = max(1, min(h * w, self.cfg.memory_candidates // self.n_images))
        for i in range(B):
            pick = torch.randperm(h * w, generator=self.gen)[:per_image]
            self.parts.append(flat[i, pick])

    def finish(self) -> dict:
        candidates = join(self.parts)
        cfg, extras = self.cfg, {}
        texture_width = TEXTURE_CHANNELS if cfg.memory_texture else 0
        width = texture_width + (POSITION_CHANNELS if cfg.memory_position else 0)
        if width:
            features = candidates[:, : candidates.shape[1] - width]
            spread = float(features.var(0).sum().sqrt()) if len(candidates) > 1 else 1.0
        if texture_width:
            block = candidates[:, features.shape[1] : features.shape[1] + texture_width]
            extras["texture"] = {
                "mean": block.mean(0),
                "std": block.std(0) + 1e-6 if len(candidates) > 1 else torch.ones(texture_width),
                "scale": cfg.memory_texture * spread / math.sqrt(texture_width),
            }
        if cfg.memory_position:
            extras["position"] = {"scale": cfg.memory_position * spread}
        candidates = scale_extras(candidates, extras)
        keep, radius = greedy_coreset(candidates, cfg.coreset_size, cfg.seed)
        state = {"bank": candidates[keep].contiguous(), "radius": radius, "n_candidates": len(candidates)}
        return {**state, **extras}


def _memory(ctx: MapContext) -> tuple[torch.Tensor, None]:
    f = memory_input(ctx.x, ctx.out, ctx.cfg)
    B, D, h, w = f.shape
    fitted = ctx.fitted["memory"]
    rows = scale_extras(f.permute(0, 2, 3, 1).reshape(-1, D), fitted)
    d, _ = nearest_distance(rows, fitted["bank"].to(f.device))
    return blur(upsample(d.view(B, h, w), ctx.size), ctx.cfg), None


def _small(x: torch.Tensor, side: int, standardised: bool = False) -> torch.Tensor:
    """Standardised images at most `side` pixels wide (area-averaged); `standardised`: `x` already is."""
    if not standardised:
        x = standardize(x)
    return F.adaptive_avg_pool2d(x, side) if x.shape[-1] > side else x


class NearestImageFitter(Fitter):
    """Every training image, standardised, at most `NEAREST_IMAGE_SIZE` pixels per side, in
    `BANK_DTYPE`."""

    def __init__(self, model: CAVGA, cfg: TrainConfig, n_images: int = 0):
        self.parts: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, out: ModelOutput) -> None:
        self.parts.append(_small(x, NEAREST_IMAGE_SIZE).to(BANK_DTYPE).cpu())

    def finish(self) -> dict:
        return {"images": join(self.parts)}


def _nearest_image(ctx: MapContext) -> tuple[torch.Tensor, torch.Tensor]:
    q = _small(ctx.x, NEAREST_IMAGE_SIZE)
    bank = ctx.fitted["nearest-image"]["images"].to(q.device)
    dist, index = nearest_distance(q.flatten(1), bank.flatten(1))
    diff = (q - bank[index]).abs().mean(1)  # (B, s, s)
    return blur(upsample(diff, ctx.size), ctx.cfg), dist / math.sqrt(q[0].numel())


register_map(
    MapSpec(
        "memory",
        "distance of each position's encoder features to the nearest of a coreset of normal training "
        "features (PatchCore-like)",
        _memory,
        fitter=MemoryFitter,
        features_only=True,
    )
)
register_map(
    MapSpec(
        "nearest-image",
        "|x − n| with n the nearest normal training image (both standardised); score: their distance",
        _nearest_image,
        fitter=NearestImageFitter,
        features_only=True,
    )
)


def image_embedding(x: torch.Tensor, out: ModelOutput, cfg: TrainConfig) -> list[torch.Tensor]:
    """Blocks of a whole-image embedding: the standardised image at ≤ `GLOBAL_PIXELS` px, then each
    `stats_layers` stage pooled to a `GLOBAL_GRID` grid, then (with `cfg.gradient_histograms`) the
    standardised image's histograms of oriented gradients on that grid; each (B, D_i)."""
    z = standardize(x.float())  # once, for the pixel block and the histograms
    blocks = [_small(z, GLOBAL_PIXELS, standardised=True).flatten(1)]
    for name in available_layers(out, cfg.stats_layers):
        blocks.append(F.adaptive_avg_pool2d(layer(out, name), GLOBAL_GRID).flatten(1))
    if cfg.gradient_histograms:
        blocks.append(gradient_histograms(z, GLOBAL_GRID))
    return [b.float() for b in blocks]


class ImageMemory(Fitter):
    """The whole-image embeddings of the normal training images. Each block is centred on the training
    mean and divided by its root total variance over the training images, so pixels and each stage
    weigh the same in the distance while each keeps its own geometry (the pixel block alone is a
    plain nearest neighbour on standardised images). The bank is kept in `BANK_DTYPE`."""

    def __init__(self, model: CAVGA, cfg: TrainConfig, n_images: int = 0):
        self.cfg = cfg
        self.parts: list[torch.Tensor] = []  # per batch, the blocks side by side
        self.widths: list[int] = []

    def update(self, x: torch.Tensor, out: ModelOutput) -> None:
        blocks = image_embedding(x, out, self.cfg)
        self.widths = [b.shape[1] for b in blocks]
        self.parts.append(torch.cat(blocks, 1).cpu())

    def finish(self) -> dict:
        bank = join(self.parts)
        state: dict = {"mean": [], "scale": []}
        start = 0
        for width in self.widths:
            block = bank[:, start : start + width]  # a view: centred and scaled in place, as `embed`
            start += width
            spread = float(block.var(0).sum().sqrt()) if len(block) > 1 else 1.0
            state["mean"].append(block.mean(0))
            state["scale"].append(spread + 1e-6)
            block.sub_(state["mean"][-1]).div_(state["scale"][-1])
        state["bank"] = bank.to(BANK_DTYPE)
        return state


def embed(blocks: list[torch.Tensor], state: dict) -> torch.Tensor:
    """Blocks (see `image_embedding`) centred and scaled with the training statistics, concatenated."""
    return torch.cat(
        [(b - m.to(b.device)) / s for b, m, s in zip(blocks, state["mean"], state["scale"], strict=True)], 1
    )


def global_score(x: torch.Tensor, out: ModelOutput, cfg: TrainConfig, state: dict) -> torch.Tensor:
    """(B,) distance of each image's embedding to its nearest normal training image's."""
    q = embed(image_embedding(x, out, cfg), state)
    return nearest_distance(q, state["bank"].to(q.device))[0]
