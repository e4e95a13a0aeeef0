"""The `cavga` command line: demo, make-demo-data, train, test, predict, export, serve, report,
compare, benchmark, models."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cavga import __version__
from cavga.config import (
    DEFAULT_PRETRAIN_STEPS,
    DEFAULT_STEPS,
    DEFAULT_STEPS_AFTER_PRETRAIN,
    PRECISIONS,
    TrainConfig,
    make_config,
)
from cavga.errors import CavgaError

# The demo trains briefly: its default map measured the same after 1 and 60 steps on the demo data
# (docs/method.md), and a new user should see results within minutes on a 2-core machine.
DEMO_STEPS = 10
# And its memory keeps 2,000 features of the 40,000 candidates instead of 4,000: the greedy coreset was a
# fifth of the demo's time (12 s per category on the older 2-core EPYC) and halving it left the mean
# pixel AUROC where it was (0.902 against 0.901; brick / grass / gravel 0.979 / 0.833 / 0.895 against
# 0.980 / 0.838 / 0.884).
DEMO_CORESET = 2_000
COMPARE_STEPS = 60
DEMO_SIZE = 128


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from cavga.data import make_demo_data

    root = make_demo_data(args.out, seed=args.seed, image_size=args.image_size)
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    print(f"demo data written to {root} (categories: {', '.join(categories)})")
    return 0


def _train_args(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "weights": args.weights,
        "anomaly_map": args.anomaly_map,
        "device": args.device,
        "checkpoint_every": args.checkpoint_every,
        "anomalous_dir": args.anomalous_dir,
        "weak_fraction": args.weak_fraction,
        "image_score": args.image_score,
        "feature_input": args.feature_input,
        "gradient_histograms": None if args.gradient_histograms is None else args.gradient_histograms == "on",
        "memory_texture": args.memory_texture,
        "memory_position": args.memory_position,
        "precision": args.precision,
        "pretrain_steps": args.pretrain_steps,
        "feature_encoders": args.feature_encoders,
    }


def cmd_train(args: argparse.Namespace) -> int:
    from cavga.engine.train import train

    if not args.data and not args.resume:
        raise CavgaError("--data is required (a folder in MVTec AD layout)")
    # With --resume the run's own settings win where it has a checkpoint; these start it where not.
    cfg = make_config(args.preset, **_train_args(args)) if args.data else None
    run = train(
        cfg,
        args.data,
        args.out or _default_out(args),
        category=args.category,
        resume=args.resume,
        steps=args.steps,
        progress=not args.quiet,
        workers=args.workers,
        cache=args.cache,
    )
    print(
        f"run saved to {run}; evaluate with: cavga test {run} (needs the data's test/ folder), "
        f"or score new images with: cavga predict {run} IMAGE_OR_FOLDER"
    )
    return 0


def _default_out(args: argparse.Namespace) -> str:
    return str(Path("runs") / f"{args.model}-{args.category or 'data'}")


def cmd_test(args: argparse.Namespace) -> int:
    from cavga.engine.evaluate import evaluate, format_table

    result = evaluate(
        args.run,
        args.data,
        args.category,
        panels=not args.no_panels,
        device=args.device,
        force=args.force,
        all_maps=args.all_maps,
        workers=args.workers,
        cache=args.cache,
    )
    print(format_table(result))
    print(
        f"\nmetrics written to {Path(args.run) / 'metrics.json'}"
        + ("" if args.no_panels else f"; panels in {Path(args.run) / 'panels'}")
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cavga.api import load_run
    from cavga.engine.predict import predict_files

    # Neither the reconstruction nor the attention is written, so neither is computed.
    predictor = load_run(args.run, args.device, args.anomaly_map, extras=False)
    run = Path(args.run)
    out = args.out or str((run.parent if run.suffix.lower() == ".onnx" else run) / "predictions")
    csv_path, failed = predict_files(
        predictor, args.inputs, out, args.batch_size, args.workers, args.resume, args.cache
    )
    print(
        f"predictions written to {csv_path}" + (f" ({failed} image(s) could not be read)" if failed else "")
    )
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from cavga.export import export_onnx, read_metadata

    path = export_onnx(args.run, args.out, args.anomaly_map)
    meta = read_metadata(path)
    print(
        f"exported {meta['model']} ({meta['anomaly_map']} map, {meta['image_size']} px, "
        f"{meta['channels']} channel(s), image threshold {meta['threshold']:.6g}) to {path}; "
        f"predict with: cavga predict {path} IMAGES"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cavga.report import write_report

    print(f"report written to {write_report(args.run, args.out)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cavga.serve import serve

    options = {"device": args.device, "max_upload_mb": args.max_upload_mb, "max_batch": args.max_batch}
    serve(args.run, args.host, args.port, args.workers, **options)
    return 0


def _add_loading(p: argparse.ArgumentParser) -> None:
    """How images are read: decoding processes and an optional cache of resized images."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that decode and resize images while the model works (default: one core "
        "fewer than this machine has, at most 4; 0 decodes in the main process)",
    )
    p.add_argument(
        "--cache",
        help="folder that keeps the resized images (keyed by file, size and modification time), "
        "so a second run over the same images does not decode them again",
    )


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The training settings among `names` that the user gave (None means: the preset's value)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


PRETRAIN_HELP = (
    "ResNet models: first train the encoder stages the memory map reads to mark synthetic anomalies of "
    f"the normal images, for N steps (default: {DEFAULT_PRETRAIN_STEPS} for cavga-ru when no --steps "
    "or --epochs is given, else 0; set back when it does not learn them; see docs/method.md)"
)
LENGTH_HELP = (
    f"(default for cavga-ru: {DEFAULT_PRETRAIN_STEPS} pre-training steps, then "
    f"{DEFAULT_STEPS_AFTER_PRETRAIN} steps; other models: {DEFAULT_STEPS} steps)"
)


def _add_run_settings(p: argparse.ArgumentParser, what: str) -> None:
    """The training settings and output options `compare` and `benchmark` share (see `_given`)."""
    p.add_argument("--preset", default="default")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--image-score", choices=("peak", "fused"), default=None, help="image score (see `cavga train`)"
    )
    p.add_argument("--pretrain-steps", type=int, default=None, metavar="N", help=PRETRAIN_HELP)
    p.add_argument("--out", required=True, help=f"output folder; a stopped {what} resumes there")
    p.add_argument("--quiet", action="store_true")


def cmd_compare(args: argparse.Namespace) -> int:
    from cavga.engine.compare import compare, parse_list

    compare(
        args.data,
        parse_list(args.models),
        args.out,
        parse_list(args.category),
        args.seeds,
        progress=not args.quiet,
        maps=tuple(parse_list(args.maps)),
        **_given(
            args, "preset", "image_size", "steps", "batch_size", "device", "image_score", "pretrain_steps"
        ),
    )
    out = Path(args.out)
    print((out / "compare.md").read_text())
    print(f"tables: {out / 'compare.csv'}, {out / 'compare.md'}; figure: {out / 'maps.png'}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from cavga.engine.benchmark import benchmark
    from cavga.engine.compare import parse_list

    benchmark(
        args.protocol,
        args.data,
        parse_list(args.models),
        args.out,
        cells=parse_list(args.category),
        seed=args.seed,
        download=args.download,
        progress=not args.quiet,
        **_given(
            args,
            "preset",
            "image_size",
            "steps",
            "epochs",
            "batch_size",
            "device",
            "image_score",
            "pretrain_steps",
        ),
    )
    out = Path(args.out)
    print((out / "benchmark.md").read_text())
    print(f"tables: {out / 'benchmark.csv'}, {out / 'benchmark.md'}; per-cell results in {out / 'results'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cavga.maps import MAPS
    from cavga.networks import MODELS
    from cavga.networks.model import PAPER_MAPS

    print(f"{'model':<20} {'setting':<18} {'kind':<9} description")
    for spec in MODELS.values():
        print(f"{spec.name:<20} {spec.setting:<18} {spec.family:<9} {spec.description}")
    print("\neach model's own map (`paper`):")
    for kind, desc in PAPER_MAPS.items():
        users = ", ".join(s.name for s in MODELS.values() if s.paper_map == kind)
        print(f"  {desc}: {users}")
    print("\nattention / anomaly maps (--attention):")
    for name, spec in MAPS.items():
        print(f"{name:<20} {spec.description}")
    return 0


def demo_config(
    image_size: int = DEMO_SIZE, steps: int = DEMO_STEPS, seed: int = 0, device: str = "auto"
) -> TrainConfig:
    """The configuration `cavga demo` trains each category with: CAVGA-Ru, briefly, a smaller memory."""
    return make_config(
        model="cavga-ru",
        image_size=image_size,
        steps=steps,
        seed=seed,
        device=device,
        coreset_size=DEMO_CORESET,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from cavga.data import make_demo_data
    from cavga.engine.evaluate import METRIC_KEYS, evaluate, format_table
    from cavga.engine.run import write_json
    from cavga.engine.train import train

    t0 = time.perf_counter()
    out = Path(args.out)
    root = make_demo_data(out / "data", seed=args.seed, image_size=args.image_size)
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    print(f"demo data: {root} ({', '.join(categories)})")
    summary = {}
    for cat in categories:
        run = out / "runs" / cat
        if (run / "checkpoint.pt").exists():
            raise CavgaError(f"{run} already holds a run; remove {out} or choose another --out")
        cfg = demo_config(args.image_size, args.steps, args.seed, args.device)
        train(cfg, root, run, category=cat, progress=not args.quiet)
        result = evaluate(run, panels=True, device=args.device)
        print(f"\n== {cat} ==\n{format_table(result)}\n")
        summary[cat] = {k: result[k] for k in METRIC_KEYS}
        summary[cat]["residual_pixel_auroc"] = result["maps"]["residual"]["overall"]["pixel_auroc"]
        summary[cat]["paper_attention_pixel_auroc"] = result["maps"]["paper"]["overall"]["pixel_auroc"]
    seconds = time.perf_counter() - t0
    write_json(
        out / "summary.json",
        {"categories": summary, "seconds": round(seconds, 1), "anomaly_map": cfg.anomaly_map},
    )
    columns = {
        "pixel_auroc": "pixel AUROC",
        "aupro": "AUPRO",
        "pixel_iou": "IoU",
        "image_auroc": "image AUROC",
        "residual_pixel_auroc": "residual",
        "paper_attention_pixel_auroc": "paper A",
    }
    print(f"{'category':<10}" + "".join(f"{h:>13}" for h in columns.values()))
    for cat, m in summary.items():
        print(f"{cat:<10}" + "".join(f"{_fmt(m[k]):>13}" for k in columns))
    print(f"\ndone in {seconds:.0f} s. Summary: {out / 'summary.json'}; runs: {out / 'runs'}/<category>/")
    print(f"Predict on new images with: cavga predict {out / 'runs' / categories[0]} IMAGE_OR_FOLDER...")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (examples in each --help)."""
    from cavga.data.protocols import PROTOCOLS

    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="cavga", description="Attention-guided anomaly localisation (CAVGA, ECCV 2020)."
    )
    p.add_argument("--version", action="version", version=f"cavga {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        formatter_class=raw,
        help="make demo data, train CAVGA-Ru on it, evaluate",
        epilog="example:\n  cavga demo --out cavga-demo",
    )
    d.add_argument("--out", default="cavga-demo", help="folder for the data and runs (default: cavga-demo)")
    d.add_argument(
        "--steps", type=int, default=DEMO_STEPS, help=f"training steps per category (default {DEMO_STEPS})"
    )
    d.add_argument("--image-size", type=int, default=DEMO_SIZE, help=f"image size (default {DEMO_SIZE})")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "make-demo-data",
        formatter_class=raw,
        help="write the built-in demo dataset (MVTec AD layout)",
        epilog="example:\n  cavga make-demo-data demo-data --seed 1",
    )
    m.add_argument("out", help="output folder")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-size", type=int, default=DEMO_SIZE)
    m.set_defaults(func=cmd_make_demo_data)

    t = sub.add_parser(
        "train",
        formatter_class=raw,
        help="train a model on the normal images of a dataset",
        epilog="examples:\n  cavga train --data demo-data --category brick --model cavga-ru --steps 200\n"
        "  cavga train --data mvtec --category bottle --model cavga-du --image-size 256 --epochs 50\n"
        "  cavga train --out runs/cavga-ru-brick --resume",
    )
    t.add_argument("--data", help="dataset root in MVTec AD layout")
    t.add_argument("--category", help="category folder inside --data (needed when it holds several)")
    t.add_argument(
        "--model", default="cavga-ru", help="model name, e.g. cavga-ru, cavga-dw (see `cavga models`)"
    )
    t.add_argument("--preset", default="default", help="default (measured on this project's data) or paper")
    t.add_argument("--image-size", type=int, default=None, help="square input size (default 128)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"training length in epochs {LENGTH_HELP}")
    length.add_argument("--steps", type=int, help="training length in steps (with --resume: new total)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--weights", help="ResNet-18 encoder weights: imagenet (downloads) or a state-dict file")
    t.add_argument(
        "--attention",
        "--anomaly-map",
        dest="anomaly_map",
        default=None,
        help="attention / anomaly map used by test and predict, recorded in the run (see `cavga models`)",
    )
    t.add_argument(
        "--anomalous-dir",
        help="weakly supervised models: a folder of your own anomalous training images (labels only) "
        "instead of the paper's 2 %% of the anomalous test images",
    )
    t.add_argument(
        "--weak-fraction",
        type=float,
        default=None,
        help="weakly supervised models: fraction of the anomalous test images moved into training (0.02)",
    )
    t.add_argument(
        "--image-score",
        choices=("peak", "fused"),
        default=None,
        help="image score of the calibrated maps: the map's peak, or fused with the whole-image "
        "nearest-neighbour score (both standardised on held-out normal images)",
    )
    t.add_argument(
        "--feature-input",
        choices=("raw", "standardised"),
        default=None,
        help="what the maps' encoder features see: each image standardised first (default; measured "
        "better on solar cells, textures and digits, see docs/method.md) or the image as it is (raw)",
    )
    t.add_argument(
        "--gradient-histograms",
        choices=("on", "off"),
        default=None,
        help="whether the whole-image embedding of the fused score also holds the image's histograms "
        "of oriented gradients on a 4 × 4 grid (default on; measured better on digits, see docs/method.md)",
    )
    t.add_argument(
        "--memory-texture",
        type=float,
        default=None,
        metavar="W",
        help="weight of the local texture statistics beside the encoder features in the memory map, "
        "relative to those features (default 1; 0: none; measured better on textures, see docs/method.md)",
    )
    t.add_argument(
        "--memory-position",
        type=float,
        default=None,
        metavar="W",
        help="weight of each position's place in the image beside its features in the memory map, "
        "relative to those features (default 0: a normal feature from anywhere; see docs/method.md)",
    )
    t.add_argument("--pretrain-steps", type=int, default=None, metavar="N", help=PRETRAIN_HELP)
    t.add_argument(
        "--feature-encoders",
        type=int,
        default=None,
        metavar="N",
        help="ResNet models from random weights: the maps read N encoders side by side, each from its "
        "own seed and pre-trained like the model's (default: 2 in the default schedule, else 1)",
    )
    t.add_argument("--checkpoint-every", type=int, default=None, help="save every N steps (default 100)")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="training arithmetic: fp32 (default), or on a GPU bf16 / fp16 autocast (fp16 with a "
        "gradient scaler)",
    )
    t.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    t.add_argument("--out", help="run folder (default runs/<model>-<category>)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, or start it there if it has none yet "
        "(so a preempted job can rerun the same command line)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_loading(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "test",
        formatter_class=raw,
        help="evaluate a run on a test split, write metrics.json",
        epilog="examples:\n  cavga test runs/cavga-ru-brick\n"
        "  cavga test runs/cavga-ru-brick --data other-root --no-panels",
    )
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="dataset root (default: the one the run was trained on)")
    e.add_argument("--category", help="category (default: the run's)")
    e.add_argument("--no-panels", action="store_true", help="skip the per-image PNG panels")
    e.add_argument("--force", action="store_true", help="test even on another category than the run's")
    e.add_argument(
        "--all-maps", action="store_true", help="also the Grad-CAM variants (a backward pass each; slower)"
    )
    e.add_argument("--device", default="auto")
    _add_loading(e)
    e.set_defaults(func=cmd_test)

    r = sub.add_parser(
        "predict",
        formatter_class=raw,
        help="score new images; write maps, masks, overlays, a CSV",
        epilog="examples:\n  cavga predict runs/cavga-ru-brick part1.png part2.png --out preds\n"
        "  cavga predict runs/cavga-ru-brick incoming/ --out preds\n"
        "  cavga predict runs/cavga-ru-brick/model.onnx incoming/ --out preds   # an exported run",
    )
    r.add_argument("run", help="run folder, or a .onnx file from `cavga export`")
    r.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    r.add_argument("--out", help="output folder (default <run>/predictions)")
    r.add_argument(
        "--attention",
        "--anomaly-map",
        dest="anomaly_map",
        default=None,
        help="override the run's attention / anomaly map (see `cavga models`)",
    )
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=None, help="images scored at once (default: the run's)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="keep the images an earlier (stopped) prediction into --out finished; score the rest",
    )
    _add_loading(r)
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser(
        "export",
        formatter_class=raw,
        help="write a trained run as one ONNX graph (images → calibrated map and score)",
        epilog="examples:\n  cavga export runs/cavga-ru-brick     # writes runs/cavga-ru-brick/model.onnx\n"
        "  cavga export runs/cavga-ru-brick --out brick.onnx --anomaly-map latent-stats\n"
        "needs: pip install 'cavga[export]'",
    )
    x.add_argument("run", help="a finished run folder")
    x.add_argument("--format", choices=("onnx",), default="onnx")
    x.add_argument("--out", help="output file (default <run>/model.onnx)")
    x.add_argument(
        "--anomaly-map", dest="anomaly_map", default=None, help="the map to export (default: the run's)"
    )
    x.set_defaults(func=cmd_export)

    o = sub.add_parser(
        "report",
        formatter_class=raw,
        help="one self-contained HTML file about a tested run: settings, curves, metrics, panels",
        epilog="examples:\n  cavga test runs/cavga-ru-brick && cavga report runs/cavga-ru-brick\n"
        "needs: pip install 'cavga[report]'",
    )
    o.add_argument("run", help="a run folder evaluated with `cavga test`")
    o.add_argument("--out", help="output file (default <run>/report.html)")
    o.set_defaults(func=cmd_report)

    v = sub.add_parser(
        "serve",
        formatter_class=raw,
        help="serve a run over HTTP: POST /predict, GET /health, /info, and a web page at /",
        epilog="examples:\n  cavga serve runs/cavga-ru-brick                  # http://127.0.0.1:8000/\n"
        "  cavga serve runs/cavga-ru-brick/model.onnx --port 9000 --workers 2\n"
        "  curl -F file=@part.png 'http://127.0.0.1:8000/predict?images=false'\n"
        "needs: pip install 'cavga[serve]'",
    )
    v.add_argument("run", help="run folder, or a .onnx file from `cavga export`")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    v.add_argument("--max-upload-mb", type=float, default=20.0, help="larger requests get 413")
    v.add_argument("--max-batch", type=int, default=16, help="images of concurrent requests scored together")
    v.add_argument("--device", default="auto")
    v.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "compare",
        formatter_class=raw,
        help="train and test several models on the same data and seeds; one table and one figure",
        epilog="examples:\n"
        "  cavga compare --data demo-data --models cavga-ru,cavga-du --steps 60 --seeds 3 --out cmp\n"
        "  cavga compare --data demo-data --models cavga-ru,cavga-rw,ae-ssim --maps paper --out cmp\n"
        "  cavga compare --data mvtec --category bottle,cable --models cavga-du --image-size 256 --out cmp",
    )
    c.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
    c.add_argument("--category", help="comma-separated categories (default: all in --data)")
    c.add_argument("--models", default="cavga-ru", help="comma-separated model names (see `cavga models`)")
    c.add_argument(
        "--steps", type=int, default=COMPARE_STEPS, help=f"training steps per run (default {COMPARE_STEPS})"
    )
    c.add_argument("--seeds", type=int, default=2, help="seeds 0 … N−1 per model and category (default 2)")
    c.add_argument(
        "--maps",
        default="paper,default",
        help="maps to tabulate and draw: names from `cavga models`, default (each run's own), all "
        "(default: paper,default)",
    )
    _add_run_settings(c, "comparison")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser(
        "benchmark",
        formatter_class=raw,
        help="every model on every category / scene / class of a paper dataset; paper-like tables",
        epilog="protocols:\n" + "".join(f"  {k:<9} {v}\n" for k, v in PROTOCOLS.items()) + "examples:\n"
        "  cavga benchmark --protocol mvtec --data mvtec_anomaly_detection --models cavga-du,cavga-dw "
        "--image-size 256 --epochs 50 --out bench-mvtec\n"
        "  cavga benchmark --protocol mnist --data ~/torchvision-data --models cavga-du --epochs 5 "
        "--out bench-mnist\n"
        "  cavga benchmark --protocol mnist5k --models cavga-du --category 0-zero,1-one --out bench-5k\n"
        "  cavga benchmark --protocol elpv --models cavga-du --image-size 64 --epochs 20 --out bench-elpv",
    )
    b.add_argument("--protocol", required=True, choices=list(PROTOCOLS))
    b.add_argument("--data", help="the dataset root as its authors ship it (not needed for mnist5k and elpv)")
    b.add_argument("--models", default="cavga-du", help="comma-separated model names (see `cavga models`)")
    b.add_argument("--category", help="comma-separated categories / scenes / classes (default: all)")
    b_length = b.add_mutually_exclusive_group()
    b_length.add_argument("--epochs", type=int, help="training epochs per cell")
    b_length.add_argument("--steps", type=int, help=f"training steps per cell {LENGTH_HELP}")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--download", action="store_true", help="MNIST-type sets: let torchvision download them")
    _add_run_settings(b, "benchmark")
    b.set_defaults(func=cmd_benchmark)

    ls = sub.add_parser("models", help="list the models and anomaly maps")
    ls.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cavga` console script."""
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not valid UTF-8 is printed with escapes rather than crashing the print.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return args.func(args)
    except CavgaError as e:
        print(f"cavga: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
