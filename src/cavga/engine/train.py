"""The training loop of every model: VAE + a real adversarial game + attention expansion (CAVGA-u),
or + classifier and complementary guided attention (CAVGA-w), or the parts a baseline keeps."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cavga.attention import attention_expansion_loss, class_attention, latent_attention
from cavga.config import DEFAULT_STEPS, TrainConfig
from cavga.data import (
    Sample,
    anomalous_folder,
    category_dir,
    infer_channels,
    list_split,
    synthesize,
    weak_split,
)
from cavga.data.stream import ImageSource, default_workers, scan
from cavga.engine import distributed
from cavga.engine import pretrain as pretraining
from cavga.engine.interrupt import StopAtStepEnd
from cavga.engine.pretrain import (
    PRETRAIN_LR,
    Segmenter,
    freeze_pretrained,
    pretrain_stages,
    segmentation_loss,
)
from cavga.engine.run import (
    CHECKPOINT,
    build_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    seed_everything,
    write_json,
)
from cavga.errors import DataError, RunError
from cavga.heap import release_free_memory
from cavga.losses import (
    classifier_loss,
    complementary_guided_attention_loss,
    discriminator_loss,
    generator_adversarial_loss,
    kl_divergence,
    mask_guided_attention_loss,
    reconstruction_loss,
)
from cavga.maps import MAPS, available_maps, calibrate, cheap_maps
from cavga.networks import CAVGA, MODELS

LOSSES = ("loss", "rec", "kl", "adv_g", "adv_d", "ae", "bce", "cga")


@dataclass
class TrainData:
    """Training images (in memory or decoded on demand, see `cavga.data.stream`), and normal images
    held out for calibration."""

    train: ImageSource  # the normal images, then any anomalous ones
    labels: torch.Tensor  # (N,) 0 normal, 1 anomalous (image labels only, weakly supervised)
    calib: ImageSource  # normal, never trained on; thresholds come from these
    anomalous_files: list[str]  # absolute paths; evaluation leaves them out of the test set
    channels: int
    skipped: list[dict[str, str]]  # files that could not be used: {file, error}

    @property
    def normal(self) -> ImageSource:
        """The normal training images (normal statistics must not see the anomalous ones)."""
        return self.train.subset(torch.nonzero(self.labels == 0).flatten().tolist())


def weak_training_files(data_dir: str | Path, category: str | None, cfg: TrainConfig) -> list[Path]:
    """The anomalous training images of a weakly supervised run: the user's folder, or the paper's
    seeded 2 % of the category's anomalous test images. Only file paths: masks are never read."""
    if cfg.anomalous_dir:
        return anomalous_folder(cfg.anomalous_dir)
    tests = list_split(category_dir(data_dir, category), "test")
    return [s.path for s in weak_split(tests, cfg.weak_fraction, cfg.seed)]


def load_train_data(
    data_dir: str | Path,
    category: str | None,
    cfg: TrainConfig,
    workers: int = 0,
    cache: str | Path | None = None,
) -> TrainData:
    """Read `train/good` of a category (decoded once in `workers` processes to find the usable images),
    and hold out `calib_fraction` of it (seeded); for a weakly supervised model add its anomalous
    training images with label 1."""
    samples = list_split(category_dir(data_dir, category), "train")
    channels = cfg.channels or infer_channels(samples)
    source, skipped = scan(samples, cfg.image_size, channels, workers, cache)
    n = len(source)
    if n < 2:
        raise DataError(f"{samples[0].path.parent}: at least 2 usable training images are needed, found {n}")
    n_cal = round(cfg.calib_fraction * n) if n >= 10 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    cal_idx, train_idx = sorted(perm[:n_cal]), sorted(perm[n_cal:])
    if not cal_idx:  # too few images to spare any: calibrate on the training images themselves
        cal_idx = train_idx
    train, labels, anomalous = source.subset(train_idx), torch.zeros(len(train_idx), dtype=torch.long), []
    if MODELS[cfg.model].setting == "weakly-supervised":
        weak = [Sample(p, 1, "anomalous", None) for p in weak_training_files(data_dir, category, cfg)]
        extra, weak_skipped = scan(weak, cfg.image_size, channels, workers, cache)
        anomalous, skipped = [s.path for s in extra.samples], skipped + weak_skipped
        train = train + extra
        labels = torch.cat([labels, torch.ones(len(extra), dtype=torch.long)])
    return TrainData(
        train, labels, source.subset(cal_idx), [str(p.resolve()) for p in anomalous], channels, skipped
    )


def keep_log_until(log_path: Path, step: int, columns: int = len(LOSSES) + 2) -> None:
    """Drop the rows of a log after `step` (a killed run logged steps its checkpoint lacks), and any
    row that is not a complete one of `columns` fields."""
    lines = log_path.read_text().splitlines(keepends=True)

    def complete_and_before(line: str) -> bool:
        fields = line.rstrip("\n").split(",")
        return (
            line.endswith("\n") and len(fields) == columns and fields[0].isdigit() and int(fields[0]) <= step
        )

    log_path.write_text("".join(lines[:1] + [ln for ln in lines[1:] if complete_and_before(ln)]))


# Offset of pre-training's synthetic anomalies, so they are not the same draws as the training steps'.
PRETRAIN_STREAM = 500_009


def synthetic_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """The generator of one step's synthetic anomalies: seeded by step, so a resumed run makes exactly
    the anomalies an uninterrupted one would; each rank draws its own (rank 0 alone draws what a
    single process does)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream + step + 7_919 * rank)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch for `step`: a fresh seeded permutation per epoch, so a resumed run
    sees exactly the batches an uninterrupted one would. Incomplete last batches are dropped
    (BatchNorm cannot train on one image)."""
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * bs : (i + 1) * bs]


class StepBatches:
    """The index lists of this rank's share of the batches of steps `start` … `total` − 1 (see
    `batch_indices`): a `DataLoader` batch sampler, so workers decode the next batches while the
    model trains."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, world: distributed.World):
        self.n, self.batch_size, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.world = world
        self.global_size = min(batch_size, n)

    def indices(self, step: int) -> list[int]:
        return self.world.shard(batch_indices(self.n, self.batch_size, step, self.seed).tolist())

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def total_steps(cfg: TrainConfig, n: int) -> int:
    """`steps`, or `epochs` × batches per epoch, or `DEFAULT_STEPS`; none for an anchor."""
    if MODELS[cfg.model].setting == "training-free":
        return 0
    if cfg.steps:
        return cfg.steps
    if cfg.epochs:
        return cfg.epochs * max(1, n // min(cfg.batch_size, n))
    return DEFAULT_STEPS


def train(
    cfg: TrainConfig | None,
    data_dir: str | Path | None,
    out_dir: str | Path,
    category: str | None = None,
    resume: bool = False,
    steps: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    cache: str | Path | None = None,
) -> Path:
    """Train (or resume) a run in `out_dir` and calibrate it; returns the run folder.

    Images are decoded in `workers` processes (None: `default_workers()`), and with `cache` kept
    resized in that folder for the next run (see `cavga.data.stream`).

    With `resume`, a run that has a checkpoint continues from it (its config and data come from
    the checkpoint; `steps` may extend it) and a finished one is left as it is; where no
    checkpoint exists yet (the run was stopped before its first one, or never started) training
    starts from step 0 with `cfg`. So a preemptible job can rerun one command line until it ends.
    """
    run = Path(out_dir)
    ckpt = None
    if resume and (run / CHECKPOINT).exists():
        ckpt = load_checkpoint(run)
        cfg = TrainConfig.from_saved(ckpt["config"])
        data_dir, category = data_dir or ckpt["data"]["root"], ckpt["data"]["category"]
        if steps:
            cfg.steps = steps
    elif resume and cfg is None:
        raise RunError(
            f"nothing to resume in {run}: it has no {CHECKPOINT} yet; give --data (and the other "
            "training options) to start it"
        )
    elif not resume and (run / CHECKPOINT).exists():
        raise RunError(f"{run} already holds a run; use --resume to continue it or choose another --out")
    assert cfg is not None and data_dir is not None
    if cfg.anomaly_map not in MAPS:  # checked before any work is done
        raise RunError(
            f"unknown attention / anomaly map {cfg.anomaly_map!r}; choose one of: {', '.join(MAPS)}"
        )
    if cfg.model not in MODELS:
        raise RunError(f"unknown model {cfg.model!r}; choose one of: {', '.join(MODELS)}")
    world, device = distributed.setup(cfg.device)
    distributed.check_batch(cfg.batch_size, world)
    check_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    workers = default_workers() if workers is None else workers
    data = load_train_data(data_dir, category, cfg, workers, cache)
    if ckpt is not None and data.channels != ckpt["config"]["channels"]:
        raise RunError(
            f"{data_dir} has {data.channels}-channel images, the run was trained on {cfg.channels}"
        )
    cfg.channels = data.channels
    model = build_model(cfg, cfg.weights if ckpt is None else None).to(device)
    if world.size > 1:
        distributed.sync_batchnorm(model)
    if cfg.anomaly_map not in available_maps(model):
        raise RunError(f"model {cfg.model} cannot make the {cfg.anomaly_map!r} map")
    if cfg.pretrain_steps:
        pretrain_stages(model, cfg)  # a model it cannot pre-train fails here, before any work
    params = model.generator_parameters()
    opt_g = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas) if params else None
    opt_d = None
    if model.discriminator is not None:
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.d_lr, betas=cfg.betas)
    step = 0
    # Encoder pre-training's progress (see `pretrain`): its step, and until it ends its head and optimiser.
    pre: dict = {"step": 0}
    pre_extra: list[dict] = [{"step": 0} for _ in model.extra_encoders]  # the same for each extra encoder
    if ckpt is not None:
        pre = dict(ckpt.get("pretrain") or pre)
        pre_extra = [dict(p) for p in ckpt.get("pretrain_extra") or pre_extra]
        load_weights(model, ckpt["model"], f"model {cfg.model} at {cfg.image_size} px")
        try:
            if opt_g is not None:
                opt_g.load_state_dict(ckpt["opt_g"])
            if opt_d is not None:
                opt_d.load_state_dict(ckpt["opt_d"])
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(
                f"the optimiser states in {run / CHECKPOINT} do not fit model {cfg.model}: {e}"
            ) from e
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
    total = total_steps(cfg, len(data.train))
    if ckpt is not None and ckpt.get("calibration") is not None and step >= total:
        return run  # already finished: rerunning the same command line is harmless
    adv_from = int(cfg.adv_start * total)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
    spec = MODELS[cfg.model]
    meta = {
        "root": str(Path(data_dir).resolve()),
        "category": category,
        "category_name": category_dir(data_dir, category).resolve().name,
        "train_files": [str(s.path) for s in data.normal.samples],
        "calib_files": [str(s.path) for s in data.calib.samples],
        "anomalous_files": data.anomalous_files,
        "anomalous_source": (cfg.anomalous_dir or "test split") if data.anomalous_files else None,
        "skipped_files": data.skipped,
    }
    if world.main:
        write_json(
            run / "config.json",
            {
                "model": cfg.model,
                "setting": spec.setting,
                "description": spec.description,
                "config": cfg.to_dict(),
                "data": meta,
            },
        )

    def state() -> dict:
        return {
            "model": model.state_dict(),
            "opt_g": opt_g.state_dict() if opt_g is not None else None,
            "opt_d": opt_d.state_dict() if opt_d is not None else None,
            "config": cfg.to_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "model_name": cfg.model,
            "setting": spec.setting,
            "data": meta,
            "pretrain": pre,
            "pretrain_extra": pre_extra,
            "calibration": None,  # added once calibrated, at the end
        }

    def save() -> None:
        if world.main:  # one writer; the other ranks hold the same weights
            save_checkpoint(run / CHECKPOINT, state())

    for index, done in enumerate([pre, *pre_extra]):
        if cfg.pretrain_steps > done["step"]:
            pretrain(model, data.normal, cfg, device, world, done, save, run, progress, index)
    # Kept or set back, the stages the default map reads stay as pre-training left them.
    fixed_stages = freeze_pretrained(model, cfg) if cfg.pretrain_steps else []
    generator, discriminator = distributed.wrap(model, world, device)
    log_path = run / "log.csv" if world.main else Path(os.devnull)
    if world.main and (step == 0 or not log_path.exists()):
        log_path.write_text(",".join(["step", *LOSSES, "seconds"]) + "\n")
    elif world.main:
        keep_log_until(log_path, step)  # rows written after the checkpoint will be written again
    last_saved = saved_checkpoint(run, "step", step)  # pre-training, when it ran, saved one
    with log_path.open("a", newline="") as log_file, StopAtStepEnd() as stop:
        log = csv.writer(log_file)
        bar = tqdm(
            total=total,
            initial=step,
            disable=not progress or not world.main,
            desc=f"train {cfg.model}" + (f" ×{world.size}" if world.size > 1 else ""),
            unit="step",
        )
        t0, first_step = time.perf_counter(), step
        model.train()
        for part in fixed_stages:
            part.eval()
        try:
            # Decoded ahead by the workers (when the images are not in memory) in the order of the steps.
            batches = StepBatches(len(data.train), cfg.batch_size, cfg.seed, step, total, world)
            stream = data.train.take(batches)
            while step < total:
                idx = batches.indices(step)
                x, y = next(stream).to(device), data.labels[idx].to(device)
                x_in, masks = x, None
                if cfg.synthetic > 0:
                    gen = synthetic_generator(cfg.seed, step, world.rank)
                    x_in, masks = synthesize(x, gen, cfg.synthetic)
                    y = (masks.flatten(1).amax(1) > 0).long()
                losses = train_step(
                    model,
                    x_in,
                    y,
                    cfg,
                    opt_g,
                    opt_d,
                    adversarial=step >= adv_from,
                    target=x,
                    masks=masks,
                    parts=(generator, discriminator),
                    noise=step_noise(cfg.seed, step, batches.global_size, world),
                    scaler=scaler,
                    sum_scale=world.size if cfg.reduction == "sum" else 1,
                )
                step += 1
                # The step's freed buffers, given back: a 3,000-image run peaked 46 MB lower, and 40
                # steps took 98.6-101.3 s against 95.0-100.0 s without (3 rounds, AMD EPYC Zen 3).
                release_free_memory()
                bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
                if bad:
                    # The weights may already hold NaN; they are never saved over a good checkpoint.
                    raise RunError(
                        f"training diverged at step {step}/{total}: "
                        + ", ".join(f"{k} = {v}" for k, v in bad.items())
                        + f"; nothing was saved. Last good checkpoint: {last_saved or NO_CHECKPOINT}. "
                        "Try a lower --lr"
                    )
                log.writerow(
                    [
                        step,
                        *(f"{losses[k]:.6g}" for k in LOSSES),
                        f"{time.perf_counter() - t0:.2f}",
                    ]
                )
                log_file.flush()  # so a stopped run's log is complete up to its last step
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k != "loss" and v})
                last_saved = (
                    end_of_step("step", step, total, cfg, run, save, stop, world, device, bar) or last_saved
                )
        except KeyboardInterrupt:
            bar.close()
            raise stopped_inside("step", step, total, last_saved) from None
        bar.close()
    train_seconds = time.perf_counter() - t0
    # The trained weights and optimiser states go to disk before calibration: a calibration that
    # fails (or is stopped) loses no training, and the gradients and Adam's moments (three times the
    # weights' memory) need not stay in memory while it runs.
    save()
    model.zero_grad(set_to_none=True)
    opt_g = opt_d = generator = discriminator = None
    t1 = time.perf_counter()
    model.eval()
    # Every rank fits the normal states on its share of the training images; rank 0 merges them,
    # calibrates on the held-out images and writes the run.
    calibration = calibrate(
        model, cfg, data.normal, data.calib, device, cheap_maps(cfg), world.rank, world.size
    )
    if not world.main:
        world.barrier()
        return run
    images = (step - first_step) * batches.global_size
    write_json(
        run / "train_summary.json",
        {
            "steps": step,
            "steps_this_session": step - first_step,
            "train_seconds": round(train_seconds, 2),
            "images_per_second": round(images / train_seconds, 2) if train_seconds > 0 and images else None,
            "calibration_seconds": round(time.perf_counter() - t1, 2),
            "device": str(device),
            "world_size": world.size,
            "precision": cfg.precision,
            "image_size": cfg.image_size,
            "batch_size": batches.global_size,
            "n_train": len(data.train),
            "n_anomalous_train": len(data.anomalous_files),
            "n_calib": len(data.calib),
            **{f"pretrain_{k}": v for k, v in pre.items()},
            **({"pretrain_extra": pre_extra} if pre_extra else {}),
        },
    )
    release_free_memory()  # calibration's freed buffers, before the checkpoint is read back
    finished = load_checkpoint(run)  # the state saved before calibration, optimisers included
    finished["calibration"] = calibration
    save_checkpoint(run / CHECKPOINT, finished)
    world.barrier()
    return run


def pretrain(
    model: CAVGA,
    normal: ImageSource,
    cfg: TrainConfig,
    device: torch.device,
    world: distributed.World,
    pre: dict,
    save: Callable[[], None],
    run: Path,
    progress: bool = True,
    index: int = 0,
) -> Segmenter:
    """`cfg.pretrain_steps` steps of encoder pre-training on synthetic anomalies of the `normal`
    images (see `cavga.engine.pretrain`), from step `pre["step"]`, before the CAVGA steps.

    `index` says which encoder (`cavga.engine.pretrain.encoders`): the model's own (0), or the k-th
    extra one, pre-trained the same way with seed `cfg.seed` + k for its head, batches and synthetic
    anomalies, and logged to `pretrain_log_<k + 1>.csv`.

    `pre` is the progress the run's checkpoint holds, updated in place; `save` writes it every
    `checkpoint_every` steps, when stopped (then `--resume` continues here) and at the end, when
    only the step count, the time and the last 50 steps' mean loss stay. Losses go to
    `pretrain_log.csv`. Several processes: the batch is split across ranks as in training.
    Returns the stages with the trained head (which the run does not keep).
    """
    cfg = dataclasses.replace(cfg, seed=cfg.seed + index)
    seg = Segmenter(model, cfg, index).to(device)
    requires_grad = [p.requires_grad for p in model.parameters()]
    opt = torch.optim.Adam(seg.trainable(), lr=PRETRAIN_LR)
    start = pre["step"]
    if start:
        seg.head.load_state_dict(pre["head"])
        opt.load_state_dict(pre["opt"])
    else:  # the stages as they were, to set back if pre-training does not learn (see `kept`)
        pre["initial"] = [{k: v.clone() for k, v in part.state_dict().items()} for part in seg.parts]
    ddp = nn.parallel.DistributedDataParallel
    net = ddp(seg, device_ids=distributed.device_ids(device)) if world.size > 1 else seg
    total = cfg.pretrain_steps
    batches = StepBatches(len(normal), cfg.batch_size, cfg.seed + 1, start, total, world)
    name = "pretrain_log.csv" if index == 0 else f"pretrain_log_{index + 1}.csv"
    log_path = run / name if world.main else Path(os.devnull)
    if world.main and (start == 0 or not log_path.exists()):
        log_path.write_text("step,loss,seconds\n")
    elif world.main:
        keep_log_until(log_path, start, columns=3)
    recent = list(pre.get("recent", []))
    step, t0 = start, time.perf_counter()
    seconds = pre.get("seconds", 0.0)

    def keep(finished: bool = False) -> None:
        pre.update(step=step, seconds=round(seconds + time.perf_counter() - t0, 2))
        pre["loss"] = round(sum(recent) / len(recent), 4) if recent else None
        if finished:
            for key in ("head", "opt", "recent", "initial"):
                pre.pop(key, None)
        else:
            pre.update(head=seg.head.state_dict(), opt=opt.state_dict(), recent=list(recent))
        save()

    model.train()
    bar = tqdm(
        total=total,
        initial=start,
        disable=not progress or not world.main,
        desc="pretrain" if index == 0 else f"pretrain encoder {index + 1}",
        unit="step",
    )
    last_saved = saved_checkpoint(run, "pre-training step", start)
    try:
        with log_path.open("a") as log, StopAtStepEnd("pre-training step") as stop:
            for x in normal.take(batches):
                gen = synthetic_generator(cfg.seed, step, world.rank, PRETRAIN_STREAM)
                x_aug, masks = synthesize(x.to(device), gen, 0.5)
                loss = segmentation_loss(net(x_aug), masks)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if not math.isfinite(loss.item()):
                    raise RunError(
                        f"encoder pre-training diverged at step {step}/{total}: loss {loss.item()}"
                    )
                recent = [*recent[-49:], loss.item()]
                log.write(f"{step},{loss.item():.6g},{seconds + time.perf_counter() - t0:.2f}\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3g}")
                last_saved = (
                    end_of_step("pre-training step", step, total, cfg, run, keep, stop, world, device, bar)
                    or last_saved
                )
    except KeyboardInterrupt:
        bar.close()
        raise stopped_inside("pre-training step", step, total, last_saved) from None
    bar.close()
    for p, flag in zip(model.parameters(), requires_grad, strict=True):
        p.requires_grad_(flag)
    # Each rank saw its own share of the batches: the ranks decide on their mean loss, together.
    final_loss = world.mean(sum(recent) / len(recent), device)
    pre["kept"] = pretraining.kept(final_loss)
    if not pre["kept"]:
        for part, initial in zip(seg.parts, pre["initial"], strict=True):
            part.load_state_dict(initial)
        if world.main:
            print(
                f"{'encoder' if index == 0 else f'encoder {index + 1}'} pre-training did not learn "
                f"the synthetic anomalies (loss {final_loss:.3f} "
                f"after {step} steps, above {pretraining.PRETRAIN_MAX_LOSS}): the stages it trained "
                "are set back to their initial weights",
                file=sys.stderr,
            )
    keep(finished=True)
    return seg


def end_of_step(
    what: str,
    step: int,
    total: int,
    cfg: TrainConfig,
    run: Path,
    save: Callable[[], None],
    stop: StopAtStepEnd,
    world: distributed.World,
    device: torch.device,
    bar: tqdm,
) -> str | None:
    """After `step` of a loop (`what`: "step" or "pre-training step"): stop there if Ctrl-C asked,
    the run saved first; else save it every `checkpoint_every` steps. Returns the checkpoint just
    written, described, or None."""
    if stop.requested(world, device):
        save()
        bar.close()
        raise RunError(
            f"interrupted at {what} {step}/{total}; saved {run / CHECKPOINT}, continue with --resume"
        )
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
        save()
        return saved_checkpoint(run, what, step)
    return None


NO_CHECKPOINT = "none (no checkpoint yet)"


def saved_checkpoint(run: Path, what: str, step: int) -> str | None:
    """The run's checkpoint, described with the step it holds, or None where there is none yet."""
    return f"{run / CHECKPOINT} ({what} {step})" if (run / CHECKPOINT).exists() else None


def stopped_inside(what: str, step: int, total: int, last_saved: str | None) -> RunError:
    """The error of a second Ctrl-C (or one that no handler caught): the step it interrupted may be
    half applied, so nothing is saved over the last checkpoint."""
    last = f"{last_saved}, continue with --resume" if last_saved else NO_CHECKPOINT
    return RunError(
        f"stopped inside {what} {step + 1}/{total}, unsaved (its weights may be half updated); "
        f"last checkpoint: {last}"
    )


def check_precision(precision: str, device: torch.device) -> None:
    """Mixed precision is for GPUs: on a CPU, bf16 autocast is slower than fp32 on most chips and
    fp16 has no CPU kernels for several layers."""
    if precision != "fp32" and device.type != "cuda":
        raise RunError(f"--precision {precision} needs a GPU (--device cuda); on a CPU train in fp32")


def step_noise(seed: int, step: int, global_size: int, world: distributed.World):
    """ε for the sampled z of one step: drawn for the whole global batch from a generator seeded by
    the step, this rank's rows taken, so any number of processes samples what one process does (and a
    resumed run what an uninterrupted one does)."""

    def noise(shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_033 + step)
        eps = torch.randn((global_size, *shape[1:]), generator=gen)
        return eps[world.rank :: world.size]

    return noise


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters need no gradient inside the block (gradients still flow through it to
    its inputs); their own settings come back after it."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def train_step(
    model,
    x: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    adversarial: bool,
    target: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    parts: tuple | None = None,
    noise=None,
    scaler: torch.amp.GradScaler | None = None,
    sum_scale: int = 1,
) -> dict[str, float]:
    """One discriminator step (when the model has one and the game is on), then one step of the rest.

    `x` is the input; `target` what the decoder must give back (the clean image when `x` carries
    synthetic anomalies, whose pixel `masks` then guide the class attention). Every term whose
    weight is 0, or whose part the model lacks, is skipped and logged as 0.

    Several processes: `parts` are the DDP-wrapped generator and discriminator (see
    `cavga.engine.distributed.wrap`), `noise` draws this rank's share of the global batch's ε, and
    `sum_scale` (the number of processes) undoes DDP's averaging for terms summed over the batch.
    `scaler` scales the losses of fp16 training; autocast follows `cfg.precision`.
    """
    target = x if target is None else target
    generator, discriminator = parts if parts is not None else (model, model.discriminator)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(x.device.type, dtype=half, enabled=half is not None)

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(opt: torch.optim.Optimizer) -> None:
        scaler.step(opt) if scaler is not None else opt.step()

    # The last step's gradients go now, not just before this backward: held through the forward
    # they would sit on top of its activations, the step's peak of memory.
    opt_g.zero_grad(set_to_none=True)
    with autocast:
        out = generator(x, noise=noise)  # z sampled
    zero = torch.zeros((), device=x.device)
    terms = dict.fromkeys(LOSSES[1:], zero)
    if adversarial and opt_d is not None and cfg.w_adv > 0:
        with autocast:
            # Dis sees x̂ detached: its step must not move the encoder or decoder.
            terms["adv_d"] = discriminator_loss(
                discriminator(target), discriminator(out.recon.detach()), cfg.real_label
            )
        opt_d.zero_grad(set_to_none=True)
        backward(terms["adv_d"])
        step(opt_d)
        with autocast, frozen(model.discriminator):
            # The module itself, not its DDP wrapper: these gradients are the generator's business.
            # Frozen, so the backward computes no weight gradients for Dis, which its own step would
            # throw away (oneDNN computes weight gradients at about half its forward rate).
            terms["adv_g"] = generator_adversarial_loss(model.discriminator(out.recon))
    with autocast:
        terms["rec"] = reconstruction_loss(out.logits.float(), target, cfg.reduction, cfg.rec_loss)
        if out.logvar is not None and cfg.w_kl > 0:
            terms["kl"] = kl_divergence(out.mu.float(), out.logvar.float(), cfg.reduction)
        if cfg.w_ae > 0:
            terms["ae"] = attention_expansion_loss(latent_attention(out))
        if out.class_logits is not None:
            terms["bce"] = classifier_loss(out.class_logits, labels)
            if cfg.w_cga > 0 and masks is not None:
                terms["cga"] = mask_guided_attention_loss(
                    *class_attention(out), out.class_logits, labels, masks
                )
            elif cfg.w_cga > 0:
                terms["cga"] = complementary_guided_attention_loss(
                    *class_attention(out), out.class_logits, labels
                )
    weights = {"rec": cfg.w_rec, "kl": cfg.w_kl, "adv_g": cfg.w_adv, "ae": cfg.w_ae, "bce": cfg.w_bce}
    loss = sum(w * terms[k] for k, w in weights.items()) + cfg.w_cga * terms["cga"]
    # Terms summed over the batch (cfg.reduction "sum") are summed over the global batch, as by one process.
    scaled = loss + (sum_scale - 1) * (cfg.w_rec * terms["rec"] + cfg.w_kl * terms["kl"])
    backward(scaled)
    step(opt_g)
    if scaler is not None:
        scaler.update()
    return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
