"""Training configuration: one dataclass, and named presets (the paper's settings and ours)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cavga.errors import CavgaError

# Training length when neither steps nor epochs are given: sized so that the default model trains and
# calibrates on about 700 images at 128 px within 30 minutes on the slower 2-core CI machine (see
# docs/method.md, "Real data").
DEFAULT_STEPS = 300
# The default model's schedule when none of steps, epochs and pretrain_steps is given (the default
# preset): encoder pre-training on synthetic anomalies, then fewer CAVGA steps. The default map reads
# only the pre-trained stages, which the CAVGA steps keep fixed, so their number changes the paper's
# maps, not the default one. With two encoders (2 × 600 + 150 steps of 16 at 128 px) ELPV poly's 736
# images took 19 min 42 s alone on the slower 2-core AMD EPYC (Zen 1), calibration included, and an
# estimated 28 min on that machine's slowest day measured: too close to the 30-minute budget. With 100
# CAVGA steps: 16 min 34 s, about 24 min on the slowest day, and the same default figures (docs/method.md,
# "Two encoders side by side").
DEFAULT_PRETRAIN_STEPS = 600
DEFAULT_STEPS_AFTER_PRETRAIN = 100
# The default schedule's maps read two encoders' stages side by side, each pre-trained from its own
# seed: the figures moved with one encoder's seed by as much as they gain from two (ELPV mono 0.9498 →
# 0.952, demo grass pixel AUROC 0.896 → 0.908; docs/method.md, "Two encoders side by side").
DEFAULT_FEATURE_ENCODERS = 2
PRECISIONS = ("fp32", "bf16", "fp16")
# Settings whose default changed, with the value a saved run that lacks them was made with.
SAVED_BEFORE = {"feature_input": "raw", "gradient_histograms": False, "memory_texture": 0.0}


@dataclass
class TrainConfig:
    """Everything that decides a run; saved in the run folder and in every checkpoint."""

    model: str = "cavga-ru"
    preset: str = "default"
    image_size: int = 128
    channels: int | None = None  # inferred from the data when None
    batch_size: int = 16
    steps: int | None = None  # total generator steps; `epochs` is converted to steps when given
    epochs: int | None = None
    seed: int = 0
    lr: float = 2e-4
    d_lr: float = 5e-5  # discriminator learning rate (its own Adam)
    betas: tuple[float, float] = (0.5, 0.999)
    # L_final = w_rec·L_R + w_kl·KL + w_adv·L_adv + w_ae·L_ae (+ w_bce·L_bce + w_cga·L_cga, weakly supervised)
    w_rec: float = 1.0
    w_kl: float = 0.01
    w_adv: float = 0.01
    w_ae: float = 0.01
    w_bce: float = 0.001
    w_cga: float = 0.01
    rec_loss: str = "bce"  # "bce" (CAVGA), "l2" (AE-L2) or "ssim" (AE-SSIM)
    reduction: str = "mean"  # "sum" (paper) or "mean" over elements for L_R and KL
    real_label: float = 0.9  # one-sided label smoothing for Dis
    adv_start: float = 0.25  # fraction of the steps before the adversarial game starts
    latent_channels: int | None = None  # model default when None
    disc_width: int = 32  # first-layer width of the DCGAN discriminator (DCGAN: 64; 32 trains 1.5× faster)
    weights: str | None = None  # ResNet-18 weights: None (random), "imagenet" or a state-dict path
    anomaly_map: str = "memory"  # which map `test` and `predict` report (see cavga.maps.MAPS)
    # latent-stats: encoder stages by stride ("z" = μ), and the neighbourhood averaged before the statistics
    stats_layers: tuple[str, ...] = ("s4", "s8")
    stats_pool: int = 3
    position_shrink: float = 0.5  # 0: per-position means, 1: one mean for all positions
    # memory (PatchCore-like): stages, neighbourhood, candidate positions and the coreset kept of them
    memory_layers: tuple[str, ...] = ("s4", "s8")
    memory_pool: int = 3
    memory_candidates: int = 40_000
    coreset_size: int = 4_000
    # Weight of the local texture statistics (orientation shares, gradient energy, mean and spread of
    # each cell's neighbourhood) beside the encoder features in the memory, relative to those
    # features' root total variance; 0: none (runs saved before it had none). See docs/method.md.
    memory_texture: float = 1.0
    # Weight of each memory position's coordinates (row and column in [0, 1]) beside its features,
    # relative to those features' root total variance: W > 0 makes the nearest normal feature one from
    # near the same place (an encoder's features depend on where they are, through its padding); 0:
    # anywhere. See docs/method.md.
    memory_position: float = 0.0
    # Image score of the calibrated maps: "peak" (the map's maximum, or its own score) or "fused" (that
    # and the whole-image nearest-neighbour distance, standardised on held-out normal images, averaged)
    image_score: str = "fused"
    # The input the maps' encoder features are computed from: "standardised" (each image to zero mean and
    # unit variance first; measured better on ELPV, the demo textures and digits, see docs/method.md)
    # or "raw" (the image in [0, 1]; what runs saved before the option existed used)
    feature_input: str = "standardised"
    # The whole-image embedding of the fused score also holds histograms of oriented gradients (HOG) of
    # the whole image on a 4 × 4 grid: shape and layout beside the pixels and pooled features (measured
    # better on digits, the same on ELPV; see docs/method.md). Runs saved before it had none.
    gradient_histograms: bool = True
    blur: float = 1 / 32  # Gaussian smoothing of the maps, σ as a fraction of the image size
    calib_fraction: float = 0.1  # normal training images held out to calibrate thresholds
    false_alarm_rate: float = 0.01  # target on held-out normal images for the calibrated thresholds
    # Weakly supervised models: this fraction of the anomalous test images (seeded, at least one) moves
    # into training with its image label only, unless `anomalous_dir` gives the user's own.
    weak_fraction: float = 0.02
    # Encoder pre-training (ResNet models; 0: none): steps of `batch_size` normal images with synthetic
    # anomalies in which the stages the memory map reads learn to mark them, before the CAVGA steps
    # (cavga.engine.pretrain; undone where it does not learn them). The default model's schedule sets
    # it (see `make_config`); 0 here keeps every explicit configuration as it was.
    pretrain_steps: int = 0
    # ResNet models from random weights: how many encoders' stages the maps read, concatenated. The
    # model's own, then `feature_encoders` − 1 more of the same architecture, the k-th drawn from seed
    # `seed` + k and pre-trained like the model's own with that seed; no CAVGA step trains them. The
    # default schedule sets 2 (see `make_config`); 1 keeps every explicit configuration as it was.
    feature_encoders: int = 1
    # Self-supervised models: the probability that a training image gets a synthetic anomaly
    synthetic: float = 0.0
    anomalous_dir: str | None = None
    checkpoint_every: int = 100
    device: str = "auto"
    # Training arithmetic: "fp32", or on a GPU "bf16" / "fp16" autocast (fp16 with a gradient scaler)
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of a saved run. Settings it predates take the value that run was made with,
        not today's default (a default that changed must not change an old run's maps)."""
        return cls.from_dict({**SAVED_BEFORE, **d})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CavgaError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("image_score", "peak") not in ("peak", "fused"):
            raise CavgaError(f"image_score must be 'peak' or 'fused', not {d['image_score']!r}")
        if d.get("feature_input", "raw") not in ("raw", "standardised"):
            raise CavgaError(f"feature_input must be 'raw' or 'standardised', not {d['feature_input']!r}")
        for key in ("memory_texture", "memory_position"):
            if not d.get(key, 0.0) >= 0:
                raise CavgaError(f"{key} must be 0 or more, not {d[key]!r}")
        if not (isinstance(d.get("feature_encoders", 1), int) and d.get("feature_encoders", 1) >= 1):
            raise CavgaError(
                f"feature_encoders must be a whole number of 1 or more, not {d['feature_encoders']!r}"
            )
        if d.get("precision", "fp32") not in PRECISIONS:
            raise CavgaError(f"precision must be one of {', '.join(PRECISIONS)}, not {d['precision']!r}")
        for key in ("betas", "stats_layers", "memory_layers"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# The paper's settings (ECCV 2020, §3.1): summed BCE + KL, weights 1 / 1 / 0.01, the adversarial game
# from the first step with one learning rate, and the map 1 − A. Kept for reproduction.
PAPER = {
    "preset": "paper",
    "w_rec": 1.0,
    "w_kl": 1.0,
    "w_adv": 1.0,
    "w_ae": 0.01,
    "reduction": "sum",
    "real_label": 1.0,
    "adv_start": 0.0,
    "d_lr": 2e-4,
    "disc_width": 64,
    "anomaly_map": "paper",
}

# Our defaults are the dataclass defaults; see docs/method.md for the measurements behind them.
PRESETS: dict[str, dict[str, Any]] = {"default": {"preset": "default"}, "paper": PAPER}


def _takes_default_schedule(values: dict[str, Any], given: dict[str, Any]) -> bool:
    """The default model from random weights, reporting a map that reads the pre-trained stages, with
    no training length given."""
    return (
        values.get("model", TrainConfig.model) == TrainConfig.model
        and values.get("weights") is None
        and values.get("anomaly_map", TrainConfig.anomaly_map) in ("memory", "latent-stats")
        and not {"steps", "epochs", "pretrain_steps"} & set(given)
    )


def make_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """A config from a named preset, then the settings the model implies (its loss, the weights it
    switches off), then explicit overrides (None values are ignored). The default model with the
    default preset and no training length given gets the default schedule (`DEFAULT_PRETRAIN_STEPS`
    of encoder pre-training, then `DEFAULT_STEPS_AFTER_PRETRAIN` steps), with
    `DEFAULT_FEATURE_ENCODERS` encoders unless the overrides say how many."""
    from cavga.networks import MODELS

    if preset not in PRESETS:
        raise CavgaError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model = overrides.get("model", TrainConfig.model)
    if model not in MODELS:
        raise CavgaError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    values = {**PRESETS[preset], **MODELS[model].config, **overrides}
    if preset == "default" and _takes_default_schedule(values, overrides):
        values.update(pretrain_steps=DEFAULT_PRETRAIN_STEPS, steps=DEFAULT_STEPS_AFTER_PRETRAIN)
        values.setdefault("feature_encoders", DEFAULT_FEATURE_ENCODERS)
    return TrainConfig.from_dict(values)
