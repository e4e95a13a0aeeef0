"""Calibration on normal images only, and `MapMaker`, which computes calibrated maps and scores.

A calibrated map's raw value r is divided by its 99th percentile on held-out normal images, then
squashed to [0, 1) as r / (1 + r), so 0.5 means "as unusual as the top 1 % of normal pixels" and the
paper's 0.5 cut becomes a threshold set without any anomalous image. Image thresholds are the
(1 − false_alarm_rate) quantile of the held-out normal images' scores.

With `image_score = "fused"` a calibrated map's image score also sees the whole image: its peak (or
its own score) and the whole-image nearest-neighbour distance (`cavga.maps.memory.global_score`),
each standardised by its mean and spread over the held-out normal images, are averaged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from cavga.config import TrainConfig
from cavga.heap import release_free_memory, trimming
from cavga.maps.common import Images, Tail, batches, forward, quantile, share
from cavga.maps.memory import ImageMemory, global_score
from cavga.maps.registry import MAPS, MapContext, available_maps
from cavga.networks import CAVGA, MODELS

SCALE_QUANTILE = 0.99
# Every pass over images gives freed heap pages back to the system every this many batches: the
# fitters' small lasting tensors sit between freed activation buffers, and each batch's buffers land
# on other free pages of the fragmented heap, which then stay resident (cavga.heap). Without it the
# held-out passes of a 3,000-image run grew resident memory by 350 MB, the heap's use by 8 MB.
TRIM_EVERY = 4
CALIBRATED = tuple(n for n, s in MAPS.items() if s.calibrated)


def needed_maps(model: CAVGA, maps: tuple[str, ...] | None, own: bool = True) -> tuple[str, ...]:
    """The maps asked for (None: every map the model can make) plus those they are computed from and,
    with `own`, the model's own map and attention (which panels and the API show)."""
    names = available_maps(model)
    if maps is None:
        return names
    want = set(maps)
    if own:
        want |= {"paper", MODELS[model.name].paper_map}
    for name in list(want):
        want.update(MAPS[name].after if name in MAPS else ())
    return tuple(n for n in names if n in want)


def costly(name: str) -> bool:
    """A Grad-CAM variant: an uncalibrated map other than `paper`, a backward pass each."""
    return name in MAPS and not MAPS[name].calibrated and name != "paper"


def cheap_maps(cfg: TrainConfig) -> tuple[str, ...]:
    """Every map but the costly ones, plus the run's own map whatever it is: what training
    calibrates and `cavga test` reports unless asked for all."""
    return tuple(n for n in MAPS if not costly(n) or n == cfg.anomaly_map)


class MapMaker:
    """Computes reconstructions, the attention and the anomaly maps for batches of images."""

    def __init__(
        self,
        model: CAVGA,
        cfg: TrainConfig,
        calibration: dict | None,
        device: torch.device,
        maps: tuple[str, ...] | None = None,
        attention: bool = True,
        outputs: bool = True,
    ):
        self.model, self.cfg, self.cal, self.device = model, cfg, calibration, device
        # Without `attention` the model's own map (`paper`) is skipped unless asked for: an exported
        # graph computes only the maps it returns.
        self.attention = attention or "paper" in (maps or ())
        self.maps = needed_maps(model, maps, own=outputs or self.attention)
        # Without `outputs` (the reconstruction, the paper's residual score and the model's own map,
        # which `cavga predict` does not write) a model with no classifier whose maps read only
        # encoder stages stops there: the decoder and the encoder's pass on the raw image were a
        # quarter of a prediction batch.
        self.lean = (
            not outputs
            and not self.attention
            and model.classifier is None
            and all(MAPS[n].features_only for n in self.maps)
        )
        cal = calibration or {}
        # Runs calibrated before the maps package stored latent-stats' statistics under "stats".
        self.fitted = cal.get("fitted", {"latent-stats": cal["stats"]} if "stats" in cal else {})
        self.scales = cal.get("scales", {})

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Uncalibrated maps (and `rawscore/<map>` where a map has its own score), plus `recon`
        (B,C,H,W) and `residual_score` (B,) unless the pass stopped at the encoder, `attention` (B,H,W)
        with `attention`, and, when fitted, `global_score` (B,)."""
        self.model.eval()
        x = x.to(self.device)
        out = forward(self.model, self.cfg, x, features_only=self.lean)
        ctx = MapContext(self.model, self.cfg, x, out, self.fitted, scales=self.scales)
        for name in sorted(self.maps, key=lambda n: bool(MAPS[n].after)):  # derived maps last
            spec = MAPS[name]
            if name == "paper" or (spec.fitter is not None and name not in self.fitted):
                continue
            if spec.after and not all(p in ctx.done and p in self.scales for p in spec.after):
                continue  # a derived map needs its parts' scales: during calibration, a second pass
            ctx.done[name], score = spec.compute(ctx)
            if score is not None:
                ctx.done[f"rawscore/{name}"] = score
        if self.attention:
            ctx.done["paper"], ctx.done["paper_score"] = MAPS["paper"].compute(ctx)
        res = dict(ctx.done)
        if out.recon is not None:
            res["recon"] = out.recon
            res["residual_score"] = (x - out.recon).abs().flatten(1).mean(1)  # the paper's image score s_a
        if out.class_logits is not None:
            res["class_probability"] = torch.softmax(out.class_logits, 1)[:, 1]
        if "image-memory" in self.fitted:
            res["global_score"] = global_score(x, out, self.cfg, self.fitted["image-memory"])
        return res

    def calibrated(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From `raw` output: calibrated maps in [0, 1] and one score per map (`score/<map>`)."""
        return self.final_scores(self.calibrated_maps(res))

    def calibrated_maps(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From `raw` output: calibrated maps in [0, 1] and each map's own score (`score/<map>`),
        not yet fused with the whole-image score (see `final_scores`)."""
        res = dict(res)
        for name in self.maps:
            if name not in res:
                continue
            if name == "paper":
                res["score/paper"] = res["paper_score"]
            elif MAPS[name].calibrated:
                if name in self.scales:
                    r = res[name] / self.scales[name]
                    res[name] = r / (1 + r)
                res[f"score/{name}"] = res.get(f"rawscore/{name}", res[name].flatten(1).amax(1))
            else:
                # The Grad-CAM maps are scaled per image (every image peaks at 1), so they take the
                # paper's reconstruction-error score s_a.
                res[f"score/{name}"] = res["residual_score"]
        return self._own_as_paper(res)

    def final_scores(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With `image_score = "fused"`, each calibrated map's score of `calibrated_maps` averaged
        with the whole-image score, both standardised on the held-out normal images. Needs only the
        scores and `global_score` of `res`, not the maps."""
        res = dict(res)
        norms = (self.cal or {}).get("score_norms", {})
        if self.cfg.image_score == "fused":
            for name in self.maps:
                # Norms exist for the calibrated maps other than `paper` (and "global", not a map).
                if name in norms and f"score/{name}" in res:
                    res[f"score/{name}"] = 0.5 * (
                        _standard(res[f"score/{name}"], norms[name])
                        + _standard(res["global_score"], norms["global"])
                    )
        return self._own_as_paper(res)

    def _own_as_paper(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A training-free anchor's own map is one of ours: report it calibrated, with its score.
        own = MODELS[self.model.name].paper_map
        if own in MAPS:
            for key, alias in ((own, "paper"), (f"score/{own}", "score/paper")):
                if key in res:
                    res[alias] = res[key]
        return res

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated maps in [0, 1] and one image score per map (`score/<map>`)."""
        return self.calibrated(self.raw(x))


def run_maps(maker: MapMaker, images: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Every map, score, reconstruction and attention for a stack of images, as NumPy arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch_size):
        for k, v in maker(images[i : i + batch_size]).items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _standard(score: torch.Tensor, norm: tuple[float, float]) -> torch.Tensor:
    return (score - norm[0]) / norm[1]


def _norm(scores: torch.Tensor) -> tuple[float, float]:
    mean = float(scores.mean())
    spread = float(scores.std()) if len(scores) > 1 else 0.0
    return mean, spread + 1e-3 * abs(mean) + 1e-12


@torch.no_grad()
def fit_normal_states(
    model: CAVGA,
    cfg: TrainConfig,
    images: Images,
    device: torch.device,
    maps: tuple[str, ...],
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """One pass over the normal training images feeding every fitter the maps need and the
    whole-image memory (for the fused score); returns the fitted state per name.

    With `world_size` processes (a distributed run, its process group initialised) each rank passes
    over its share of the images; rank 0 gathers and merges every rank's accumulations and returns
    the states, the other ranks return None.
    """
    model.eval()
    fitters = {n: MAPS[n].fitter(model, cfg, len(images)) for n in maps if MAPS[n].fitter is not None}
    fitters["image-memory"] = ImageMemory(model, cfg, len(images))
    release_free_memory()  # what training's buffers left in the heap, before the fitters add to it
    for xb in trimming(batches(share(images, rank, world_size), cfg.batch_size), TRIM_EVERY):
        xb = xb.to(device)
        out = forward(model, cfg, xb, features_only=True)
        for f in fitters.values():
            f.update(xb, out)
    if world_size > 1:
        gathered: list | None = [None] * world_size if rank == 0 else None
        dist.gather_object({n: f.accumulated() for n, f in fitters.items()}, gathered, dst=0)
        if gathered is None:
            return None
        for n, f in fitters.items():
            f.merge([g[n] for g in gathered[1:]])
    return {n: f.finish() for n, f in fitters.items()}


@torch.no_grad()
def calibrate(
    model: CAVGA,
    cfg: TrainConfig,
    train_images: Images,
    calib_images: Images,
    device: torch.device,
    maps: tuple[str, ...] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """Normal states from the training images; scales, score norms and thresholds from held-out normal
    images. No anomalous image is used.

    In a distributed run every rank computes the normal states of its share of the training images
    (see `fit_normal_states`); rank 0 then calibrates on the held-out images alone and returns the
    calibration, the other ranks return None.

    Also stores each map's mean over the held-out normal images: the image-independent reference map
    that evaluation reports beside the real one. (Held-out, not training images: a memory map is near
    zero on the images it memorised.)
    """
    maps = needed_maps(model, maps)
    fitted = fit_normal_states(model, cfg, train_images, device, maps, rank, world_size)
    if fitted is None:
        return None
    cal: dict = {"fitted": fitted, "scales": {}}
    maker = MapMaker(model, cfg, cal, device, maps)  # shares cal["scales"], filled below
    scaled = [n for n in maps if MAPS[n].calibrated and n != "paper"]
    derived = [n for n in scaled if MAPS[n].after]
    # The held-out maps are streamed, never held: a pass for the scales of the maps computed directly,
    # one for the derived maps' (they need their parts' scales), then one with every scale known.
    _set_scales(cal, maker, calib_images, cfg.batch_size, [n for n in scaled if n not in derived])
    if derived:
        _set_scales(cal, maker, calib_images, cfg.batch_size, derived)
    scores: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, torch.Tensor] = {}
    for xb in trimming(batches(calib_images, cfg.batch_size), TRIM_EVERY):
        for k, v in maker.calibrated_maps(maker.raw(xb)).items():
            if k.startswith("score/") or k == "global_score":
                scores.setdefault(k, []).append(v)
            elif k in maps:
                sums[k] = sums[k] + v.sum(0) if k in sums else v.sum(0)
    own = {k: torch.cat(v) for k, v in scores.items()}
    cal["mean_maps"] = {k: (v / len(calib_images)).cpu() for k, v in sums.items()}
    cal["score_norms"] = {"global": _norm(own["global_score"])}
    cal["score_norms"].update({n: _norm(own[f"score/{n}"]) for n in scaled if f"score/{n}" in own})
    final = maker.final_scores(own)
    cal["image_thresholds"] = {
        name: quantile(final[f"score/{name}"], 1 - cfg.false_alarm_rate)
        for name in maps
        if f"score/{name}" in final
    }
    return cal


def _set_scales(
    cal: dict, maker: MapMaker, images: Images, batch_size: int, names: list[str] | tuple[str, ...]
) -> None:
    """Each of `names`' scale: the `SCALE_QUANTILE` of its raw values over `images` (one pass that
    computes only these maps and their parts: no attention, no other map)."""
    if not names:
        return
    m = maker
    only = MapMaker(m.model, m.cfg, m.cal, m.device, tuple(names), attention=False, outputs=False)
    tails: dict[str, Tail] = {}
    for xb in trimming(batches(images, batch_size), TRIM_EVERY):
        res = only.raw(xb)
        for name in names:
            if name in res:
                if name not in tails:
                    tails[name] = Tail(len(images) * res[name][0].numel(), SCALE_QUANTILE)
                tails[name].update(res[name])
    for name, tail in tails.items():
        cal["scales"][name] = tail.value() + 1e-12
