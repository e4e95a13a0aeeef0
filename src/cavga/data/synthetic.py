"""Synthetic anomalies made on the fly from normal images, with exact masks, for self-supervised training.

Holds Perlin-noise generators (`perlin_noise`, `perlin_masks`), six anomaly kinds (`KINDS`: a patch of
another image, a procedural texture, an intensity change, CutPaste and its scar variant, a local elastic
warp and thin crack-like lines) and `synthesize`, which gives a batch of normal images anomalies of randomly
drawn kinds. The approach follows DRAEM, CutPaste and NSA; the code is our own.

The returned mask is exactly the set of pixels that changed: ``mask == ((x_aug - x).abs().amax(1) > 0)``.
Pixels outside the mask are bit-for-bit the input, and every masked pixel moves by at least `MIN_CHANGE`
in some channel (a fill that happens to match the original is pushed away from it).

Every random number comes from the caller's `torch.Generator` (drawn on the generator's device, then moved
to the images' device), so a seed fixes the result. The work is vectorised over the batch.

Speed, 16 images with all kinds mixed, p = 0.5 / p = 1, on a 2-core "AMD EPYC" VM shared with other jobs
(torch 2.14 on CPU, one torch thread): grey 128x128 about 13-20 / 20-33 ms, colour 256x256 about 45-55 /
95-105 ms; a batch all of one kind at most about 37 / 126 ms (distortion). On that busy VM torch's default
two threads contend and make every call 10-30 times slower: use torch.set_num_threads(1) there (DataLoader
workers already run with one thread).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

KINDS: tuple[str, ...] = ("foreign-patch", "texture", "intensity", "cutpaste", "distortion", "blur-line")

# The smallest change of a masked pixel (largest over its channels): two grey levels of an 8-bit image,
# so that no labelled pixel is invisible and the mask always equals the changed set.
MIN_CHANGE = 2 / 255

# Coverage of the Perlin-shaped regions that `synthesize` uses (fraction of the image).
MASK_MIN_FRACTION = 0.02
MASK_MAX_FRACTION = 0.3

# The largest side at which mask noise is made; bigger images get it upsampled (the outlines need no more).
_NOISE_SIDE = 64

# Perlin noise with unit gradients lies in [-sqrt(2)/2, sqrt(2)/2]; this scales it to about [-1, 1].
_PERLIN_SCALE = math.sqrt(2.0)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- random draws
# Everything is drawn on the generator's own device (a CPU generator cannot fill a CUDA tensor), then moved.


def _rand(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * _rand(shape, gen, device)


def _randint(low: int, high: int, shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
    return torch.randint(low, high, shape, generator=gen, device=gen.device).to(device)


def _randn(shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(device)


def _coin(n: int, prob: float, gen: torch.Generator, device) -> Tensor:
    return _rand((n,), gen, device) < prob


# ---------------------------------------------------------------------------------------------- Perlin noise


def _fade(t: Tensor) -> Tensor:
    # Perlin's quintic: zero first and second derivatives at the lattice, so no visible grid creases.
    return t * t * t * (t * (t * 6 - 15) + 10)


def _axis_weights(coord: Tensor, cells: int) -> tuple[Tensor, Tensor]:
    """Interpolation along one axis as matrices (n, L, cells), from lattice coordinates coord (n, L) >= 0:
    `plain` holds the fade weights of the two surrounding lattice lines, `slope` the same weights times the
    signed distance to each line (the factor that multiplies the gradient component along this axis)."""
    n, length = coord.shape
    lower = coord.floor()
    frac = coord - lower
    fade = _fade(frac)
    index = torch.stack((lower.long(), lower.long() + 1), 2)  # (n, L, 2)
    weight = torch.stack((1 - fade, fade), 2)
    distance = torch.stack((frac, frac - 1), 2)
    plain = coord.new_zeros((n, length, cells)).scatter_(2, index, weight)
    slope = coord.new_zeros((n, length, cells)).scatter_(2, index, weight * distance)
    return plain, slope


def _gradient_noise(u: Tensor, v: Tensor, gen: torch.Generator) -> Tensor:
    """Perlin noise on an axis-aligned grid: rows at lattice coordinates u (n, H), columns at v (n, W), both
    >= 0; returns (n, H, W), each of the n fields with its own random unit gradients.

    Perlin noise is a sum over the four corners of a cell of fade(row) * fade(col) * (gradient . offset), and
    on an axis-aligned grid that sum factorises: noise = Ar Gu Bcᵀ + Ap Gv Bdᵀ, with per-axis interpolation
    matrices (see _axis_weights) and the gradients' two components Gu, Gv on the lattice. Two small batched
    matrix products replace per-pixel gathers, which is what makes the masks cheap on a CPU.
    """
    n = u.shape[0]
    gy = int(u.max().floor().item()) + 2
    gx = int(v.max().floor().item()) + 2
    angles = _uniform((n, gy, gx), 0.0, 2 * math.pi, gen, u.device)
    row_plain, row_slope = _axis_weights(u, gy)
    col_plain, col_slope = _axis_weights(v, gx)
    along_rows = row_slope @ torch.sin(angles) @ col_plain.transpose(1, 2)
    along_cols = row_plain @ torch.cos(angles) @ col_slope.transpose(1, 2)
    return _PERLIN_SCALE * (along_rows + along_cols)


def _perlin_fields(
    h: int,
    w: int,
    periods_y: Tensor,
    periods_x: Tensor,
    theta: Tensor,
    gen: torch.Generator,
    octaves: int = 1,
    cap: int | None = None,
) -> Tensor:
    """n Perlin fields (n, h, w): field i has periods_y[i] x periods_x[i] lattice cells across the image, a
    random sub-cell offset (so no lattice point, where Perlin noise is always 0, sits at a fixed pixel) and is
    rotated by theta[i] about the centre. With octaves > 1 it is fractal: octave o has 2**o times the periods
    (at most `cap`) and amplitude 0.5**o.

    Rotated fields are made axis-aligned on a square canvas that holds the image at any angle, then read at
    rotated positions with bilinear grid_sample.
    """
    n = periods_y.shape[0]
    device = periods_y.device
    rotated = (theta != 0).nonzero().flatten()
    if rotated.numel() == 0:
        return _axis_aligned_fields(h, w, h, w, periods_y, periods_x, gen, octaves, cap)
    # Only the rotated fields pay for the larger canvas.
    fields = torch.empty((n, h, w), device=device)
    straight = (theta == 0).nonzero().flatten()
    if straight.numel():
        fields[straight] = _axis_aligned_fields(
            h, w, h, w, periods_y[straight], periods_x[straight], gen, octaves, cap
        )
    side = math.ceil(math.hypot(h, w)) + 2
    canvas = _axis_aligned_fields(side, side, h, w, periods_y[rotated], periods_x[rotated], gen, octaves, cap)
    m = rotated.numel()
    cos = torch.cos(theta[rotated]).view(m, 1, 1)
    sin = torch.sin(theta[rotated]).view(m, 1, 1)
    yy = (torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2).view(1, h, 1)
    xx = (torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2).view(1, 1, w)
    # align_corners=True: -1 and 1 are the centres of the canvas's first and last pixels.
    grid = torch.stack((sin * yy + cos * xx, cos * yy - sin * xx), -1) / ((side - 1) / 2)
    fields[rotated] = F.grid_sample(canvas.unsqueeze(1), grid, mode="bilinear", align_corners=True)[:, 0]
    return fields


def _axis_aligned_fields(
    rows: int,
    cols: int,
    h: int,
    w: int,
    periods_y: Tensor,
    periods_x: Tensor,
    gen: torch.Generator,
    octaves: int,
    cap: int | None,
) -> Tensor:
    """Unrotated (fractal) Perlin fields (n, rows, cols) whose cells have the size that periods_y x periods_x
    cells across an h x w image give."""
    n = periods_y.shape[0]
    device = periods_y.device
    # All octaves in one batch of fields (octave-major): one call instead of one per octave.
    scale = (2 ** torch.arange(octaves, device=device)).view(octaves, 1)
    py = (periods_y.view(1, n) * scale).flatten()
    px = (periods_x.view(1, n) * scale).flatten()
    if cap is not None:
        py, px = py.clamp(max=cap), px.clamp(max=cap)
    offset = _rand((2, octaves * n, 1), gen, device)
    u = torch.arange(rows, device=device, dtype=torch.float32).view(1, rows) * (py.float() / h).view(-1, 1)
    v = torch.arange(cols, device=device, dtype=torch.float32).view(1, cols) * (px.float() / w).view(-1, 1)
    fields = _gradient_noise(u + offset[0], v + offset[1], gen).view(octaves, n, rows, cols)
    if octaves == 1:
        return fields[0]
    amplitude = (0.5 ** torch.arange(octaves, device=device, dtype=torch.float32)).view(octaves, 1, 1, 1)
    return (fields * amplitude).sum(0)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator, device=None
) -> torch.Tensor:
    """2-D gradient (Perlin) noise, (H, W), values about in [-1, 1]; res = number of lattice periods per axis.

    H and W need not be multiples of res: the noise is evaluated at continuous coordinates, with pixel
    (i, j) at lattice position (i * res[0] / H, j * res[1] / W). Random gradients come from `generator`;
    the result is on `device` (default: the generator's device), float32.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1:
        raise ValueError(f"perlin_noise needs a positive shape, got {tuple(shape)}")
    if ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise needs at least one lattice period per axis, got res={tuple(res)}")
    device = torch.device(device) if device is not None else generator.device
    u = torch.arange(h, device=device, dtype=torch.float32).view(1, h) * (ry / h)
    v = torch.arange(w, device=device, dtype=torch.float32).view(1, w) * (rx / w)
    return _gradient_noise(u, v, generator)[0]


def _mask_counts(h: int, w: int, min_fraction: float, max_fraction: float) -> tuple[int, int]:
    """The smallest and largest pixel counts whose coverage lies in [min_fraction, max_fraction], and that
    leave the mask neither empty nor the whole image."""
    if not 0 < min_fraction <= max_fraction < 1:
        raise ValueError(f"need 0 < min_fraction <= max_fraction < 1, got {min_fraction}, {max_fraction}")
    total = h * w
    low = max(1, math.ceil(min_fraction * total))
    high = min(total - 1, math.floor(max_fraction * total))
    if low > high:
        raise ValueError(
            f"no mask of a {h}x{w} image covers between {min_fraction} and {max_fraction} of it; "
            "use a larger image or a wider range"
        )
    return low, high


def _perlin_regions(
    n: int, h: int, w: int, gen: torch.Generator, device, min_fraction: float, max_fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """`perlin_masks` for an h x w image: the masks (n, h, w) bool, the noise (n, h, w) they threshold and
    the thresholds (n,); noise - threshold is a smooth margin, >= 0 inside the mask."""
    low, high = _mask_counts(h, w, min_fraction, max_fraction)
    if n == 0:
        empty = torch.zeros((0, h, w), device=device)
        return empty.bool(), empty, torch.zeros(0, device=device)
    side = min(h, w)
    # Lattice scale: 2 .. side/8 cells across, drawn per axis so blobs are round or elongated.
    top_exp = max(1, int(math.log2(max(side / 8, 2))))
    exp_y = _randint(1, top_exp + 1, (n,), gen, device)
    # The other axis within a factor of two, so blobs may be elongated but not streaks.
    exp_x = (exp_y + _randint(-1, 2, (n,), gen, device)).clamp(1, top_exp)
    rotated = _coin(n, 0.5, gen, device)
    theta = torch.where(
        rotated, _uniform((n,), 0.0, 2 * math.pi, gen, device), torch.zeros((), device=device)
    )
    # Outlines need no more detail than _NOISE_SIDE px across: larger images get their noise made at that
    # size and upsampled (bilinear), so the masks of big images cost what small ones do.
    shrink = max(1.0, side / _NOISE_SIDE)
    nh, nw = max(1, round(h / shrink)), max(1, round(w / shrink))
    # Three octaves (fractal noise) give ragged, natural outlines; the finest is capped at 4 px per cell.
    noise = _perlin_fields(nh, nw, 2**exp_y, 2**exp_x, theta, gen, octaves=3, cap=max(2, min(nh, nw) // 4))
    if (nh, nw) != (h, w):
        # align_corners=True: every pixel is interpolated (False repeats the border rows and columns, and
        # repeated values tie at the threshold, which costs a sort below).
        noise = F.interpolate(noise.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=True)[:, 0]
    # Threshold by rank rather than at a fixed level: the k highest pixels, with k drawn log-uniformly in the
    # allowed range, so the coverage is guaranteed instead of resampled until it fits.
    log_k = _uniform((n,), math.log(low), math.log(high), gen, device)
    counts = log_k.exp().round().long().clamp(low, high)
    flat = noise.reshape(n, -1)
    # A selection per mask (kthvalue) is much cheaper than sorting; the k-th largest is the (hw - k + 1)-th
    # smallest.
    total = h * w
    level = torch.stack(
        [row.kthvalue(total - k + 1).values for row, k in zip(flat, counts.tolist(), strict=True)]
    )
    masks = flat >= level.view(n, 1)
    # Noise values tied at the threshold would keep more than k pixels; rank those masks exactly.
    for i in (masks.sum(1) != counts).nonzero().flatten().tolist():
        order = flat[i].argsort(descending=True, stable=True)
        masks[i] = torch.zeros_like(masks[i]).scatter(0, order[: int(counts[i])], True)
    return masks.view(n, h, w), noise, level


def perlin_masks(
    n: int,
    size: int,
    generator: torch.Generator,
    device=None,
    min_fraction: float = MASK_MIN_FRACTION,
    max_fraction: float = MASK_MAX_FRACTION,
) -> torch.Tensor:
    """(n, size, size) bool masks: thresholded fractal/multi-octave Perlin noise with a random lattice
    scale per mask (powers of two from 2 to size/8 or so), randomly rotated or not, so blobs of varied shape
    and size; every mask non-empty and covering between min_fraction and max_fraction of the image (resample
    or adjust the threshold to guarantee it).

    Each mask keeps the k highest-noise pixels, k drawn log-uniformly so that its coverage k / size**2 lies
    in [min_fraction, max_fraction] (and 1 <= k < size**2). Result on `device` (default: the generator's).
    Raises ValueError when no pixel count of a size x size image fits the range.
    """
    if n < 0 or size < 1:
        raise ValueError(f"perlin_masks needs n >= 0 and size >= 1, got n={n}, size={size}")
    device = torch.device(device) if device is not None else generator.device
    return _perlin_regions(n, size, size, generator, device, min_fraction, max_fraction)[0]


# ------------------------------------------------------------------------------------------------ helpers


def _view4(t: Tensor) -> Tensor:
    """Per-image values (n,) as (n, 1, 1, 1) to broadcast over images."""
    return t.view(-1, 1, 1, 1)


class _Regions(NamedTuple):
    """Perlin-shaped anomaly regions of some images: masks (n, H, W) bool, the noise (n, H, W) they
    threshold, and the thresholds (n,)."""

    masks: Tensor
    noise: Tensor
    level: Tensor


# ---------------------------------------------------------------------------------------------- the kinds
# Each kind takes the whole batch (float32, (B, C, H, W)), the indices (n,) of the images it changes, their
# Perlin regions (for the kinds in _REGION_KINDS, else None) and the generator, and returns candidate images
# (n, C, H, W) and their masks (n, H, W) bool. Only the candidate's masked pixels are used; `synthesize`
# then makes sure that exactly those pixels change. Candidates start as copies (batch[index] copies), so a
# kind may write into them; `batch` itself is never written (it may be the caller's x).


def _foreign_patch(
    batch: Tensor, index: Tensor, regions: _Regions, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A Perlin region filled from another image of the batch, moved by a random dihedral transform and a
    cyclic shift, blended with opacity beta in [0.5, 1] (DRAEM). A batch of one uses the image itself."""
    b, _, h, w = batch.shape
    n = index.numel()
    device = batch.device
    source = (index + _randint(1, b, (n,), gen, device)) % b if b > 1 else index
    # Per-image moves: a quarter turn (square images only), flips and a cyclic shift. A nonzero row shift
    # keeps the source from being the identical image when it is the image itself.
    turn = _coin(n, 0.5, gen, device) & (h == w)
    flip_y = _coin(n, 0.5, gen, device)
    flip_x = _coin(n, 0.5, gen, device)
    shift_y = _randint(1, h, (n,), gen, device)
    shift_x = _randint(0, w, (n,), gen, device)
    beta = _uniform((n,), 0.5, 1.0, gen, device)
    # Only the region's pixels are used, so only they are fetched: the source pixel of each, by the move.
    mask = regions.masks
    image, row, col = mask.nonzero(as_tuple=True)
    t = turn[image]
    src_row, src_col = torch.where(t, col, row), torch.where(t, row, col)
    src_row = torch.where(flip_y[image], h - 1 - src_row, src_row)
    src_col = torch.where(flip_x[image], w - 1 - src_col, src_col)
    src_row = (src_row + shift_y[image]) % h
    src_col = (src_col + shift_x[image]) % w
    out = batch[index]  # a copy, written in place
    patch = batch[source[image], :, src_row, src_col]  # (k, C)
    out[image, :, row, col] = torch.lerp(out[image, :, row, col], patch, beta[image].unsqueeze(1))
    return out, mask


def _texture(batch: Tensor, index: Tensor, regions: _Regions, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A Perlin region filled with a procedural texture unrelated to the data: Perlin noise at a finer scale,
    (soft or hard) stripes, or a smooth random colour field, at a random mean intensity and tint."""
    _, c, h, w = batch.shape
    n = index.numel()
    device = batch.device
    side = min(h, w)
    style = _randint(0, 3, (n,), gen, device).tolist()
    mean = _uniform((n,), 0.1, 0.9, gen, device)
    amplitude = _uniform((n,), 0.1, 0.4, gen, device)
    tint = _uniform((n, c), -0.15, 0.15, gen, device) if c > 1 else torch.zeros((n, c), device=device)
    level = (mean.view(n, 1) + tint).view(n, c, 1, 1)
    out = torch.empty((n, c, h, w), device=device)
    for kind in range(3):
        chosen = torch.tensor([i for i, k in enumerate(style) if k == kind], dtype=torch.long, device=device)
        m = chosen.numel()
        if m == 0:
            continue
        if kind == 0:  # Perlin noise, 4 .. side/4 cells across (finer than the region's own outline)
            top_exp = max(2, int(math.log2(max(side / 4, 4))))
            periods = 2 ** _randint(2, top_exp + 1, (2, m), gen, device)
            theta = _uniform((m,), 0.0, 2 * math.pi, gen, device) * _coin(m, 0.5, gen, device)
            pattern = _perlin_fields(h, w, periods[0], periods[1], theta, gen).unsqueeze(1)
        elif kind == 1:  # stripes: 2 .. side/6 periods across, any direction; tanh sharpens some into bars
            freq = _uniform((m, 1, 1, 1), 2.0, max(side / 6, 3.0), gen, device)
            theta = _uniform((m, 1, 1, 1), 0.0, math.pi, gen, device)
            phase = _uniform((m, 1, 1, 1), 0.0, 2 * math.pi, gen, device)
            sharp = _uniform((m, 1, 1, 1), 1.0, 6.0, gen, device)
            yy = torch.arange(h, device=device, dtype=torch.float32).view(1, 1, h, 1)
            xx = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, 1, w)
            along = (yy * torch.cos(theta) + xx * torch.sin(theta)) * (2 * math.pi / side)
            pattern = torch.tanh(sharp * torch.sin(freq * along + phase)) / torch.tanh(sharp)
        else:  # a smooth random field per channel (colour blotches), from a coarse grid
            cells = int(_randint(2, 6, (1,), gen, device).item())
            coarse = _uniform((m, c, cells, cells), -1.0, 1.0, gen, device)
            pattern = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        out[chosen] = (level[chosen] + _view4(amplitude[chosen]) * pattern).clamp(0, 1)
    return out, regions.masks


def _intensity(
    batch: Tensor, index: Tensor, regions: _Regions, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A Perlin region darkened or brightened (times 0.3..0.7 or 1.3..2.0, or plus/minus 0.2..0.5), or its
    contrast about its own mean scaled by one of those factors; clipped to [0, 1]."""
    x = batch[index]
    n = index.numel()
    device = batch.device
    mask = regions.masks
    area = mask.flatten(1).sum(1).clamp(min=1)
    region_mean = (x.mean(1) * mask).flatten(1).sum(1) / area
    # Darken bright regions more often than dark ones (and vice versa), so the change is rarely clipped away.
    darken = _rand((n,), gen, device) < region_mean.clamp(0.2, 0.8)
    factor = torch.where(darken, _uniform((n,), 0.3, 0.7, gen, device), _uniform((n,), 1.3, 2.0, gen, device))
    offset = _uniform((n,), 0.2, 0.5, gen, device) * torch.where(darken, -1.0, 1.0)
    mode = _randint(0, 3, (n,), gen, device)
    # Each mode is x * gain + bias: scaling (factor, 0), shifting (1, offset), contrast about the region's
    # mean (factor, mean * (1 - factor)).
    gain = torch.where(mode == 1, 1.0, factor)
    bias = torch.where(mode == 0, 0.0, torch.where(mode == 1, offset, region_mean * (1 - factor)))
    return torch.addcmul(_view4(bias), x, _view4(gain)).clamp_(0, 1), mask


def _cutpaste(
    batch: Tensor, index: Tensor, regions: _Regions | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """CutPaste: a rectangle (2-15 % of the area, aspect 0.3-3.3) cut from the image and pasted elsewhere in
    it, or a scar (a thin rotated rectangle, width 2-6 %, length 10-40 % of the size) moved by 15-40 % of
    the size (wrapping around the border); half the pastes get a brightness jitter of 0.8-1.2. The mask is
    the pasted shape, rasterised exactly (the pixels whose centres lie inside it)."""
    _, _, h, w = batch.shape
    n = index.numel()
    device = batch.device
    side = min(h, w)
    # Every number is drawn for the whole batch first (one fixed order of draws), then used image by image:
    # slicing one rectangle or a scar's bounding box is far cheaper than index arithmetic over whole images.
    scar = _coin(n, 0.5, gen, device)
    area = _uniform((n,), 0.02, 0.15, gen, device) * (h * w)
    aspect = torch.exp(_uniform((n,), math.log(0.3), math.log(1 / 0.3), gen, device))
    rect_h = torch.sqrt(area * aspect).round().clamp(1, h - 1)
    rect_w = torch.sqrt(area / aspect).round().clamp(1, w - 1)
    corners = _rand((5, n), gen, device)
    width = (_uniform((n,), 0.02, 0.06, gen, device) * side).clamp(min=1.0)
    length = (_uniform((n,), 0.1, 0.4, gen, device) * side).clamp(min=2.0)
    theta = _uniform((n,), 0.0, math.pi, gen, device)
    centre = _rand((2, n), gen, device)
    distance = _uniform((n,), 0.15, 0.4, gen, device) * side
    heading = _uniform((n,), 0.0, 2 * math.pi, gen, device)
    jitter = torch.where(_coin(n, 0.5, gen, device), _uniform((n,), 0.8, 1.2, gen, device), 1.0)
    draws = torch.stack(
        (scar.float(), rect_h, rect_w, *corners, width, length, theta, *centre, distance, heading, jitter), 1
    ).tolist()

    out = batch[index]  # a copy, written in place
    mask = torch.zeros((n, h, w), dtype=torch.bool, device=device)
    for i, (is_scar, rh, rw, c0, c1, c2, c3, c4, wd, ln, th, cy, cx, dist, head, jit) in enumerate(draws):
        image = batch[index[i]]
        if not is_scar:
            # Integer rectangle; source and target corners inside the image and never the same.
            rh, rw = int(rh), int(rw)
            room_y, room_x = h - rh + 1, w - rw + 1  # room_y >= 2, as rh <= h - 1
            ty, tx, sy, sx = int(c0 * room_y), int(c1 * room_x), int(c2 * room_y), int(c3 * room_x)
            if (ty, tx) == (sy, sx):
                sy = (sy + 1 + int(c4 * (room_y - 1))) % room_y
            patch = image[:, sy : sy + rh, sx : sx + rw]
            out[i, :, ty : ty + rh, tx : tx + rw] = (patch * jit).clamp(0, 1)
            mask[i, ty : ty + rh, tx : tx + rw] = True
            continue
        # Scar: centre far enough from the border for its length (where the image allows), a pixel inside it
        # when its centre's rotated coordinates lie within half the length and half the width.
        my, mx = min(ln / 2, (h - 1) / 2), min(ln / 2, (w - 1) / 2)
        cy, cx = my + cy * (h - 1 - 2 * my), mx + cx * (w - 1 - 2 * mx)
        reach = math.hypot(ln / 2, wd / 2)
        r0, r1 = max(0, math.floor(cy - reach)), min(h - 1, math.ceil(cy + reach))
        q0, q1 = max(0, math.floor(cx - reach)), min(w - 1, math.ceil(cx + reach))
        rows = torch.arange(r0, r1 + 1, device=device)
        cols = torch.arange(q0, q1 + 1, device=device)
        dy = (rows.float() - cy).view(-1, 1)
        dx = (cols.float() - cx).view(1, -1)
        along = dy * math.cos(th) + dx * math.sin(th)
        across = dx * math.cos(th) - dy * math.sin(th)
        thin = (along.abs() <= ln / 2) & (across.abs() <= wd / 2)
        shift_y, shift_x = round(dist * math.sin(head)), round(dist * math.cos(head))
        if shift_y == 0 and shift_x == 0:
            shift_x = 1
        patch = image.index_select(1, (rows + shift_y) % h).index_select(2, (cols + shift_x) % w)
        box = out[i, :, r0 : r1 + 1, q0 : q1 + 1]
        box.copy_(torch.where(thin, (patch * jit).clamp(0, 1), box))
        mask[i, r0 : r1 + 1, q0 : q1 + 1] = thin
    return out, mask


def _distortion(
    batch: Tensor, index: Tensor, regions: _Regions, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """An elastic warp inside a Perlin region: a smooth Perlin displacement (amplitude 6-15 % of the size),
    faded to zero at the region's edge, sampled with grid_sample. The mask is the region's pixels that moved
    by at least MIN_CHANGE (where the warp lands on a near-identical value the pixel is left as it was); a
    region that nothing visibly moves in (a flat area) keeps its whole shape and gets the minimum change."""
    x = batch[index]  # a copy, written in place
    n, _, h, w = x.shape
    device = batch.device
    side = min(h, w)
    region, noise, level = regions
    top_exp = max(1, int(math.log2(max(side / 16, 2))))
    periods = 2 ** _randint(1, top_exp + 1, (2, 2 * n), gen, device)
    # Displacement fields (x then y, in units of `amplitude` pixels): smooth (cells of 16 px or more), so
    # made at up to _NOISE_SIDE px and read bilinearly.
    fh, fw = min(h, _NOISE_SIDE), min(w, _NOISE_SIDE)
    theta = torch.zeros(2 * n, device=device)
    field = _perlin_fields(fh, fw, periods[0], periods[1], theta, gen).view(n, 2, fh, fw)
    amplitude = _uniform((n,), 0.06, 0.15, gen, device) * side

    # Only the region's pixels can change, so only they are warped: each image's region pixels become a
    # 1 x K "image" of sample points (K = the largest region, shorter ones padded) for grid_sample.
    image, row, col = region.nonzero(as_tuple=True)
    counts = region.flatten(1).sum(1)
    slot = torch.arange(image.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[image]
    longest = int(counts.max())

    def sample(source: Tensor, at_row: Tensor, at_col: Tensor, border: str) -> Tensor:
        # align_corners=True: -1 and 1 are the centres of the first and last pixels.
        grid = torch.zeros((n, 1, longest, 2), device=device)
        grid[image, 0, slot] = torch.stack(
            (at_col * (2 / max(w - 1, 1)) - 1, at_row * (2 / max(h - 1, 1)) - 1), -1
        )
        values = F.grid_sample(source, grid, mode="bilinear", padding_mode=border, align_corners=True)
        return values[image, :, 0, slot]  # (k, channels)

    # Fade the displacement to zero at the region's edge, so the warp does not tear the image there: the
    # noise's margin above the threshold is 0 on the outline and grows smoothly inside; full strength from
    # a quarter of the way to the region's peak.
    peak = (noise.flatten(1).amax(1) - level).clamp(min=1e-6)
    margin = noise[image, row, col] - level[image]
    strength = (margin / (0.25 * peak[image])).clamp(0, 1) * amplitude[image]
    shift = sample(field, row.float(), col.float(), "border") * strength.unsqueeze(1)
    warped = sample(x, row + shift[:, 1], col + shift[:, 0], "border").clamp(0, 1)
    moved = (warped - x[image, :, row, col]).abs().amax(1) >= MIN_CHANGE
    x[image, :, row, col] = warped
    mask = torch.zeros_like(region)
    mask[image[moved], row[moved], col[moved]] = True
    still = ~mask.flatten(1).any(1)
    mask[still] = region[still]
    return x, mask


def _blur_line(
    batch: Tensor, index: Tensor, regions: _Regions | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One to three crack-like curves: random-walk polylines (6 steps, turning gradually) of 20-60 % of the
    size, 1.2-3 px wide, drawn towards a dark or bright value with soft (blurred) edges. The mask is every
    pixel whose centre lies within half the width of the curve."""
    x = batch[index]
    n, _, h, w = x.shape
    device = batch.device
    side = min(h, w)
    per_image, steps = 3, 6
    m = n * per_image
    owner = torch.arange(n, device=device).repeat_interleave(per_image)
    # The first curve of each image is always drawn, the others with probability 0.4.
    active = _coin(m, 0.4, gen, device) | (torch.arange(m, device=device) % per_image == 0)
    length = _uniform((m,), 0.2, 0.6, gen, device) * side
    start = torch.stack(
        (_uniform((m,), 0.2, 0.8, gen, device) * (h - 1), _uniform((m,), 0.2, 0.8, gen, device) * (w - 1)), 1
    )
    heading = _uniform((m, 1), 0.0, 2 * math.pi, gen, device) + torch.cumsum(
        0.4 * _randn((m, steps), gen, device), 1
    )
    step = (length / steps).view(m, 1, 1) * torch.stack((torch.sin(heading), torch.cos(heading)), 2)
    vertices = torch.cat((start.view(m, 1, 2), start.view(m, 1, 2) + torch.cumsum(step, 1)), 1)
    # Sample each segment densely (<= 0.4 px apart) so discs around the samples make a gap-free stroke.
    per_segment = math.ceil(float(length.max()) / steps / 0.4) + 1
    t = torch.linspace(0, 1, per_segment, device=device).view(1, 1, per_segment, 1)
    points = (vertices[:, :-1, None] + t * (vertices[:, 1:, None] - vertices[:, :-1, None])).view(m, -1, 2)
    radius = _uniform((m,), 0.6, 1.5, gen, device)  # half of the 1.2-3 px width
    # Every pixel within 2 px of a sample's nearest pixel (enough for radius <= 1.5) is a candidate; rows
    # and columns are handled separately and broadcast to the 5 x 5 block, which keeps the arrays small.
    near = points.round()
    step5 = torch.arange(-2, 3, device=device)
    rows = near[..., 0].long().unsqueeze(-1) + step5  # (m, P, 5)
    cols = near[..., 1].long().unsqueeze(-1) + step5
    dy = (near[..., 0] - points[..., 0]).unsqueeze(-1) + step5  # (m, P, 5)
    dx = (near[..., 1] - points[..., 1]).unsqueeze(-1) + step5
    r = radius.view(m, 1, 1, 1)
    distance = torch.sqrt(dy.unsqueeze(-1) ** 2 + dx.unsqueeze(-2) ** 2) / r  # (m, P, 5, 5)
    inside = ((rows >= 0) & (rows < h)).unsqueeze(-1) & ((cols >= 0) & (cols < w)).unsqueeze(-2)
    valid = inside & (distance <= 1) & active.view(m, 1, 1, 1)
    flat = (owner.view(m, 1, 1) * (h * w) + rows * w).unsqueeze(-1) + cols.unsqueeze(-2)
    # The nearest curve sample, in units of that curve's radius, for every pixel of every image.
    nearest = torch.full((n * h * w,), math.inf, device=device)
    nearest.scatter_reduce_(0, flat[valid], distance[valid], reduce="amin")
    nearest = nearest.view(n, h, w)
    mask = nearest <= 1
    # Cracks are usually dark; still, lean towards bright lines on dark images so they stay visible.
    dark = _rand((n,), gen, device) < x.mean((1, 2, 3)).clamp(0.1, 0.9)
    value = torch.where(dark, _uniform((n,), 0.0, 0.1, gen, device), _uniform((n,), 0.9, 1.0, gen, device))
    strength = _uniform((n,), 0.6, 1.0, gen, device)
    # Blend only the (few) masked pixels, with soft edges: full strength on the curve, 40 % at its border.
    image, row, col = mask.nonzero(as_tuple=True)
    alpha = (strength[image] * (1 - 0.6 * nearest[image, row, col] ** 2)).unsqueeze(1)
    x[image, :, row, col] = (1 - alpha) * x[image, :, row, col] + alpha * value[image].unsqueeze(1)
    return x, mask


_MAKERS: dict[str, Callable[[Tensor, Tensor, _Regions | None, torch.Generator], tuple[Tensor, Tensor]]] = {
    "foreign-patch": _foreign_patch,
    "texture": _texture,
    "intensity": _intensity,
    "cutpaste": _cutpaste,
    "distortion": _distortion,
    "blur-line": _blur_line,
}
assert tuple(_MAKERS) == KINDS
# The kinds whose anomaly is shaped by a Perlin region; `synthesize` makes all their regions in one batch.
_REGION_KINDS = frozenset({"foreign-patch", "texture", "intensity", "distortion"})


# -------------------------------------------------------------------------------------------- synthesize


def _check_inputs(x: Tensor, p: float, kinds: tuple[str, ...]) -> None:
    if isinstance(kinds, str) or not kinds:
        raise ValueError(
            f"kinds must be a non-empty tuple of kind names from {', '.join(KINDS)}; got {kinds!r}"
        )
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown:
        raise ValueError(
            f"unknown anomaly kind(s) {', '.join(map(repr, unknown))}; the kinds are {', '.join(KINDS)}"
        )
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    if min(x.shape[2:]) < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got {tuple(x.shape[2:])}")
    if x.numel():
        low, high = torch.aminmax(x)
        if low < 0 or high > 1:
            raise ValueError(f"x must hold values in [0, 1], got values from {float(low)} to {float(high)}")


def synthesize(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.5, kinds: tuple[str, ...] = KINDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C, H, W) normal images in [0, 1] (C = 1 or 3, H = W). Returns (x_aug (B, C, H, W) in [0, 1],
    mask (B, H, W) float 0/1).
    Each image, with probability p, gets one synthetic anomaly of a kind drawn from `kinds`; the others are
    returned unchanged with an empty mask.

    Guarantees: ``mask == ((x_aug - x).abs().amax(1) > 0)`` exactly; pixels outside the mask are bit-for-bit
    those of x; every masked pixel differs from x by at least MIN_CHANGE (2/255) in some channel; an anomaly's
    mask is never empty nor the whole image. x is not modified. x_aug and mask have x's dtype and device.
    Kinds are drawn uniformly from `kinds` (repeat a name to weight it). Same generator state, same result.
    Raises ValueError for an unknown kind, p outside [0, 1], images smaller than 8x8 or values outside [0, 1].
    Any C >= 1 and H != W also work (rectangles only skip the quarter-turn of foreign-patch).
    """
    kinds = tuple(kinds) if not isinstance(kinds, str) else kinds
    _check_inputs(x, p, kinds)
    b, _, h, w = x.shape
    device = x.device
    # Kinds are computed in float32; the result is cast back to x's dtype before the exactness step below.
    batch = x.to(torch.float32)
    out = x.clone()
    mask = torch.zeros((b, h, w), dtype=torch.bool, device=device)
    if b == 0:
        return out, mask.to(x.dtype)
    chosen = (_rand((b,), generator, device) < p).tolist()
    kind_of = _randint(0, len(kinds), (b,), generator, device).tolist()
    names = [kinds[k] if c else None for c, k in zip(chosen, kind_of, strict=True)]
    # One batch of Perlin regions for every image whose kind needs one: one call instead of one per kind.
    shaped = [i for i, name in enumerate(names) if name in _REGION_KINDS]
    regions = _Regions(
        *_perlin_regions(len(shaped), h, w, generator, device, MASK_MIN_FRACTION, MASK_MAX_FRACTION)
    )
    slot = {image: i for i, image in enumerate(shaped)}
    for name in dict.fromkeys(kinds):  # each distinct kind once, in the order given
        members = [i for i, other in enumerate(names) if other == name]
        if not members:
            continue
        index = torch.tensor(members, dtype=torch.long, device=device)
        shapes = None
        if name in _REGION_KINDS:
            rows = torch.tensor([slot[i] for i in members], dtype=torch.long, device=device)
            shapes = _Regions(*(part[rows] for part in regions))
        candidate, anomaly = _MAKERS[name](batch, index, shapes, generator)
        anomaly = _nonempty_not_full(anomaly, generator)
        # Only the masked pixels are written (a region covers at most about a third of an image).
        image, row, col = anomaly.nonzero(as_tuple=True)
        where = index[image]
        out[where, :, row, col] = _enforce_change(
            x[where, :, row, col], candidate[image, :, row, col].to(x.dtype)
        )
        mask[where, row, col] = True
    return out, mask.to(x.dtype)


def _nonempty_not_full(mask: Tensor, gen: torch.Generator) -> Tensor:
    """Add one random pixel to an empty mask, remove one from a full one (only tiny images can need it)."""
    n = mask.shape[0]
    flat = mask.reshape(n, -1)
    count = flat.sum(1)
    empty = count == 0
    full = count == flat.shape[1]
    if not (empty.any() or full.any()):
        return mask
    flat = flat.clone()
    pixel = _randint(0, flat.shape[1], (n,), gen, mask.device)
    rows = torch.arange(n, device=mask.device)
    flat[rows[empty], pixel[empty]] = True
    flat[rows[full], pixel[full]] = False
    return flat.view_as(mask)


def _enforce_change(before: Tensor, after: Tensor) -> Tensor:
    """The masked pixels' values, before (k, C) and after (k, C) the anomaly, in x's dtype: a pixel whose
    change is below MIN_CHANGE in every channel moves to before +/- MIN_CHANGE per channel instead, in the
    direction the anomaly was going where that stays in [0, 1], else the other way. Computed in x's dtype,
    so the difference is exactly nonzero after rounding."""
    weak = (after - before).abs().amax(1) < MIN_CHANGE
    if not weak.any():
        return after
    up = before + MIN_CHANGE
    down = before - MIN_CHANGE
    go_up = ((after >= before) & (up <= 1)) | (down < 0)
    return torch.where(weak.unsqueeze(1), torch.where(go_up, up, down), after)
