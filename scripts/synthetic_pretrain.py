"""Experiment: teach the encoder's first stages what a local defect is, from good images only.

ResNet-18's stem, layer1 and layer2 (the stages at stride 4 and 8 that the `memory` map, the
`latent-stats` map and the whole-image score read) and a small 1×1 head on their 3×3-pooled features
are trained to segment the synthetic anomalies of `cavga.data.synthetic` per stride-4 cell (BCE, the
positive cells weighted up), on each image standardised as the maps see it. No real anomaly is read:
the images are `train/good` less the held-out calibration images of `cavga train` with the same
`--seed` and `--image-size`. The result is a torchvision-format ResNet-18 state dict (layer3 and
layer4 as initialised; the head goes beside it, in FILE.head) for

    python scripts/synthetic_pretrain.py --data DIR --category C --out enc.pt
    cavga train --data DIR --category C --weights enc.pt --steps 1 --out RUN && cavga test RUN

Measured in docs/method.md ("Experiment: the encoder trained to segment synthetic anomalies"). The
package's option `cavga train --pretrain-steps N` does the same with all three parts trained (its own
batch order and draws); this script keeps the variants (`--first`, `--keep`).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from cavga.config import TrainConfig, make_config
from cavga.data.synthetic import synthesize
from cavga.engine.pretrain import segmentation_loss
from cavga.engine.train import load_train_data
from cavga.maps.memory import memory_features
from cavga.networks.anchor import standardize
from cavga.networks.model import ModelOutput
from cavga.networks.resnet import ResNetEncoder

TRAINED = 2  # layer1 and layer2: the stride-4 and stride-8 stages


def pooled_stages(enc: ResNetEncoder, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The memory map's input (`memory_features`: s4 and s8, 3×3-averaged, stacked on s4's grid).
    The encoder runs only up to the trained stages: layer3 and layer4 are not needed here."""
    feats = enc(x, TRAINED)
    return memory_features(ModelOutput(feats, feats[max(feats)], None, None, None, None, None), cfg)


def torchvision_names(enc: ResNetEncoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict under torchvision's ResNet-18 names (what `--weights FILE` reads)."""
    renamed = {}
    for key, value in enc.state_dict().items():
        if key.startswith("stem.0."):
            renamed["conv1." + key.removeprefix("stem.0.")] = value
        elif key.startswith("stem.1."):
            renamed["bn1." + key.removeprefix("stem.1.")] = value
        elif key.startswith("layers."):
            index, rest = key.removeprefix("layers.").split(".", 1)
            renamed[f"layer{int(index) + 1}.{rest}"] = value
    return renamed


def held_out_detection(
    enc: ResNetEncoder, head: nn.Module, images: torch.Tensor, cfg: TrainConfig, seed: int
) -> float:
    """Cell AUROC of the head on synthetic anomalies (one per image, seeded) made on the held-out
    normal images, which training never saw: whether the stages learned to tell an altered cell.
    Needs no real anomaly."""
    from sklearn.metrics import roc_auc_score

    x_aug, mask = synthesize(images, torch.Generator().manual_seed(seed), 1.0)
    enc.eval()
    with torch.no_grad():
        logits = head(pooled_stages(enc, standardize(x_aug), cfg))
    target = F.adaptive_max_pool2d(mask[:, None], logits.shape[-2:])
    return float(roc_auc_score(target.flatten().numpy(), logits.flatten().numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category")
    ap.add_argument("--out", required=True, help="the state dict to write")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--synthetic", type=float, default=0.5, help="share of images given an anomaly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--first",
        choices=("stem", "layer1", "layer2"),
        default="stem",
        help="the first part trained; the parts before it keep their random weights",
    )
    ap.add_argument(
        "--keep",
        type=float,
        default=0.0,
        help="weight of a term holding the unaltered cells' features near the initial encoder's",
    )
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    cfg = make_config(image_size=args.image_size, seed=args.seed, batch_size=args.batch_size)
    data = load_train_data(args.data, args.category, cfg)
    enc = ResNetEncoder(data.channels)
    # The initial encoder normalises with batch statistics, as the trained one does while it trains.
    initial = copy.deepcopy(enc).requires_grad_(False) if args.keep > 0 else None
    width = 64 + 128
    head = nn.Sequential(nn.Conv2d(width, 64, 1), nn.ReLU(True), nn.Conv2d(64, 1, 1))
    parts = {"stem": enc.stem, "layer1": enc.layers[0], "layer2": enc.layers[1]}
    names = list(parts)
    for name in names[: names.index(args.first)]:
        # Frozen parts still update their BatchNorm statistics, as in the random encoder's one step.
        parts[name].requires_grad_(False)
    trained = [p for name in names[names.index(args.first) :] for p in parts[name].parameters()]
    opt = torch.optim.Adam([*trained, *head.parameters()], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    order = (
        torch.randint(0, len(data.train), (args.batch_size,), generator=gen).tolist()
        for _ in range(args.steps)
    )
    enc.train()
    t0, smooth = time.perf_counter(), None
    for step, x in enumerate(data.train.take(order), 1):
        x_aug, mask = synthesize(x, gen, args.synthetic)
        feats = pooled_stages(enc, standardize(x_aug), cfg)
        logits = head(feats)
        loss = segmentation_loss(logits, mask)
        if initial is not None:
            # What a random encoder carries (a digit's shape, a texture's statistics) stays where
            # nothing was altered: the relative squared change of the features there.
            with torch.no_grad():
                before = pooled_stages(initial, standardize(x_aug), cfg)
            keep = 1 - F.adaptive_max_pool2d(mask[:, None], logits.shape[-2:])
            change = ((feats - before) ** 2 * keep).sum() / ((before**2) * keep).sum().clamp_min(1e-6)
            loss = loss + args.keep * change
        opt.zero_grad()
        loss.backward()
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            seconds = time.perf_counter() - t0
            rate = step * args.batch_size / seconds
            print(f"step {step}/{args.steps}  loss {smooth:.4f}  {seconds:.0f} s  {rate:.1f} images/s")
    torch.save(torchvision_names(enc), args.out)
    torch.save(head.state_dict(), args.out + ".head")
    held_out = torch.cat(list(data.calib.batches(64)))
    detection = held_out_detection(enc, head, held_out, cfg, args.seed + 1)
    print(f"held-out synthetic-anomaly cell AUROC: {detection:.3f}")
    print(f"wrote {args.out}: use it with cavga train --weights {args.out}")


if __name__ == "__main__":
    main()
