"""Encoder pre-training on synthetic anomalies (`--pretrain-steps`): what it learns, what it moves,
and that a stopped run resumes exactly."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

import cavga.engine.pretrain as pretraining
import cavga.engine.train as train_mod
from cavga.cli import main
from cavga.config import (
    DEFAULT_FEATURE_ENCODERS,
    DEFAULT_PRETRAIN_STEPS,
    DEFAULT_STEPS_AFTER_PRETRAIN,
    TrainConfig,
    make_config,
)
from cavga.data.folder import load_image
from cavga.data.synthetic import synthesize
from cavga.engine.distributed import World
from cavga.engine.pretrain import Segmenter
from cavga.engine.run import load_checkpoint, seed_everything
from cavga.engine.train import build_model, load_train_data
from cavga.errors import RunError
from cavga.maps.common import forward
from cavga.networks.anchor import standardize
from tiny_data import TINY_SIZE, small_demo


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_demo(tmp_path_factory.mktemp("pretrain-demo"))


def cell_auroc(seg: Segmenter, images: torch.Tensor, seed: int) -> float:
    """How well the head ranks the cells that fresh synthetic anomalies altered above the others."""
    x, masks = synthesize(images, torch.Generator().manual_seed(seed), 1.0)
    seg.eval()
    with torch.no_grad():
        logits = seg(x)
    target = torch.nn.functional.adaptive_max_pool2d(masks[:, None].float(), logits.shape[-2:])
    return float(roc_auc_score(target.flatten().numpy(), logits.flatten().numpy()))


def ctrl_c_at_synthetic_batch(monkeypatch, n: int):
    """SIGINT as pre-training makes its `n`-th batch of synthetic anomalies; returns the real
    `synthesize` to put back."""
    real_synthesize, calls = train_mod.synthesize, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return real_synthesize(*args, **kwargs)

    monkeypatch.setattr(train_mod, "synthesize", interrupted)
    return real_synthesize


@pytest.fixture
def keep_any(monkeypatch) -> None:
    """Keep the pre-trained stages whatever the loss: these tests train far too few steps for the
    loss to reach `PRETRAIN_MAX_LOSS`."""
    monkeypatch.setattr(pretraining, "PRETRAIN_MAX_LOSS", float("inf"))


def test_pretraining_learns_synthetic_anomalies_and_moves_only_the_stages_read(
    data: Path, tmp_path: Path, keep_any
) -> None:
    """40 steps on 11 brick images at 64 px: on the 5 normal test images, which it never saw, the
    head tells the cells that fresh synthetic anomalies altered from the rest far better than
    before (measured 0.43 → 0.87; 0.80 and 0.89 on two other draws of anomalies); only the stem and
    the two stages the memory map reads change (weights and BatchNorm statistics), not layer3,
    layer4, z or the decoder; and every parameter needs gradients again afterwards."""
    cfg = make_config(model="cavga-ru", image_size=64, batch_size=8, pretrain_steps=40)
    train = load_train_data(data, None, cfg)
    torch.manual_seed(0)  # the random encoder the figures above were measured with
    model = build_model(cfg, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = sorted((data / "brick" / "test" / "good").iterdir())
    held_out = torch.stack([load_image(p, 64, train.channels) for p in good])
    assert held_out.dtype == torch.float32 and len(held_out) == 5
    start = cell_auroc(Segmenter(model, cfg), held_out, seed=1)
    pre: dict = {"step": 0}
    cpu = torch.device("cpu")
    seg = train_mod.pretrain(model, train.normal, cfg, cpu, World(), pre, lambda: None, tmp_path, False)

    assert pre["step"] == 40 and set(pre) == {"step", "seconds", "loss", "kept"} and pre["kept"]
    log = (tmp_path / "pretrain_log.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in log]
    assert len(losses) == 40 and pre["loss"] == pytest.approx(sum(losses[-40:]) / 40, abs=1e-3)
    end = cell_auroc(seg, held_out, seed=1)
    assert start < 0.6 and end > 0.8, (start, end)
    after = model.state_dict()
    moved = {k.split(".")[1] if k.startswith("encoder.") else k.split(".")[0]
             for k in after if not torch.equal(before[k], after[k])}  # fmt: skip
    assert moved == {"stem", "layers"}
    layers = {
        k.split(".")[2]
        for k in after
        if k.startswith("encoder.layers.") and not torch.equal(before[k], after[k])
    }
    assert layers == {"0", "1"}
    assert all(p.requires_grad for p in model.parameters())


def test_pretraining_stopped_and_resumed_matches_an_uninterrupted_run(
    data: Path, tmp_path: Path, monkeypatch, capsys, keep_any, ctrl_c
) -> None:
    """Ctrl-C in pre-training step 3 of 4 saves the run after that step; `--resume` finishes
    pre-training and the CAVGA steps with the weights of a run that was never stopped, and logs each
    step once. The CAVGA steps leave the pre-trained stages as they are."""
    settings = ["--model", "cavga-ru", "--image-size", str(TINY_SIZE), "--batch-size", "4", "--steps", "2"]
    settings += ["--pretrain-steps", "4", "--quiet", "--device", "cpu", "--data", str(data)]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *settings, "--out", str(full)]) == 0

    # Ctrl-C as the third step begins: that step finishes, then the run is saved.
    real_synthesize = ctrl_c_at_synthetic_batch(monkeypatch, 3)
    assert main(["train", *settings, "--out", str(part)]) == 2
    assert "interrupted at pre-training step 3/4" in capsys.readouterr().err
    saved = load_checkpoint(part)
    assert saved["step"] == 0 and saved["pretrain"]["step"] == 3 and "head" in saved["pretrain"]
    monkeypatch.setattr(train_mod, "synthesize", real_synthesize)
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b["step"] == 2 and b["pretrain"]["step"] == 4 and "head" not in b["pretrain"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (part / "pretrain_log.csv").read_text().count("\n") == 5  # header + 4 steps
    # The CAVGA steps keep the pre-trained stages as they are (weights and BatchNorm statistics):
    # after 1 or 2 of them they are the same, while the rest of the encoder moved.
    one = tmp_path / "one"
    assert main(["train", *[v if v != "2" else "1" for v in settings], "--out", str(one)]) == 0
    c = load_checkpoint(one)["model"]
    kept = ("encoder.stem.", "encoder.layers.0.", "encoder.layers.1.")
    assert all(torch.equal(v, c[k]) for k, v in a["model"].items() if k.startswith(kept))
    assert not torch.equal(
        a["model"]["encoder.layers.2.0.conv1.weight"], c["encoder.layers.2.0.conv1.weight"]
    )
    summary = (part / "train_summary.json").read_text()
    assert '"pretrain_step": 4' in summary


def test_pretraining_that_does_not_learn_is_set_back(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A pre-training whose final loss stays above `PRETRAIN_MAX_LOSS` leaves no trace in the
    weights: the stages it trained are set back to their initial weights and BatchNorm statistics,
    and, like kept ones, stay so through the CAVGA steps (the default map reads them), while the rest
    of the encoder trains; the run says so."""
    settings = ["--model", "cavga-ru", "--image-size", str(TINY_SIZE), "--batch-size", "4", "--steps", "2"]
    settings += ["--quiet", "--device", "cpu", "--data", str(data)]
    reset = tmp_path / "reset"
    monkeypatch.setattr(pretraining, "PRETRAIN_MAX_LOSS", 0.0)
    initial: dict = {}  # the weights pre-training starts from
    real_pretrain = train_mod.pretrain

    def pretrain_after_a_copy(model, *args):
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_pretrain(model, *args)

    monkeypatch.setattr(train_mod, "pretrain", pretrain_after_a_copy)
    assert main(["train", *settings, "--pretrain-steps", "3", "--out", str(reset)]) == 0
    assert "did not learn the synthetic anomalies" in capsys.readouterr().err
    b = load_checkpoint(reset)
    assert b["pretrain"]["step"] == 3 and b["pretrain"]["kept"] is False and "initial" not in b["pretrain"]
    stages = ("encoder.stem.", "encoder.layers.0.", "encoder.layers.1.")
    assert any(k.endswith("running_var") for k in initial if k.startswith(stages))
    assert all(torch.equal(v, b["model"][k]) for k, v in initial.items() if k.startswith(stages))
    later = "encoder.layers.2.0.conv1.weight"
    assert not torch.equal(initial[later], b["model"][later])


def test_pretraining_needs_a_resnet_encoder(data: Path, tmp_path: Path, capsys) -> None:
    """A DCGAN model with --pretrain-steps stops before any work, saying why."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "cavga-du", "--image-size", str(TINY_SIZE)]
    assert main([*args, "--pretrain-steps", "3", "--out", str(out), "--quiet"]) == 2
    assert "--pretrain-steps trains a ResNet-18 encoder; model cavga-du has none" in capsys.readouterr().err
    assert not out.exists()


def test_compare_passes_pretraining_on_and_says_so(data: Path, tmp_path: Path) -> None:
    """`cavga compare --pretrain-steps 2` pre-trains each run and states it above the table."""
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data), "--models", "cavga-ru", "--image-size", str(TINY_SIZE)]
    args += ["--steps", "1", "--batch-size", "4", "--seeds", "1", "--pretrain-steps", "2", "--out", str(out)]
    assert main([*args, "--quiet", "--device", "cpu"]) == 0
    # Two steps do not learn the synthetic anomalies, so the run set its stages back, and says so.
    assert "1 steps after 2 pre-training steps (kept in 0 of 1 runs)" in (out / "compare.md").read_text()
    summary = (out / "runs" / "cavga-ru" / "brick" / "seed0" / "train_summary.json").read_text()
    assert '"pretrain_step": 2' in summary


def test_the_default_schedule_pretrains_the_default_model_only() -> None:
    """With no training length given, cavga-ru from random weights pre-trains, then takes fewer
    CAVGA steps; any length, another model, other weights, a map that does not read the pre-trained
    stages or the paper's preset keep the plain schedule."""
    schedule = (DEFAULT_PRETRAIN_STEPS, DEFAULT_STEPS_AFTER_PRETRAIN)

    def of(preset: str = "default", **given) -> tuple:
        cfg = make_config(preset, **given)
        return cfg.pretrain_steps, cfg.steps

    assert of() == of(model="cavga-ru", image_size=64, anomaly_map="latent-stats") == schedule
    assert of(steps=5) == (0, 5) and of(epochs=2) == (0, None)
    assert of(pretrain_steps=100) == (100, None) and of(pretrain_steps=0) == (0, None)
    assert of(model="cavga-du") == of(model="cavga-rw") == of(weights="imagenet") == (0, None)
    assert of(anomaly_map="paper") == of("paper") == (0, None)
    # Two encoders with the schedule, unless asked otherwise; one wherever the schedule is not taken.
    assert make_config().feature_encoders == DEFAULT_FEATURE_ENCODERS == 2
    assert make_config(feature_encoders=1).feature_encoders == make_config(steps=5).feature_encoders == 1
    assert TrainConfig.from_saved({}).feature_encoders == 1  # a run saved before had one


def test_an_extra_encoder_is_drawn_from_the_next_seed_and_the_maps_read_both() -> None:
    """`feature_encoders` 2: the model's own encoder is the one it has alone, the extra one holds the
    first stages of the encoder that the next seed draws (as `build_model` right after seeding), and
    the maps read both stages side by side (the model's first)."""
    one = make_config(model="cavga-ru", image_size=64, seed=3, pretrain_steps=0, channels=1)
    two = make_config(
        model="cavga-ru", image_size=64, seed=3, pretrain_steps=0, channels=1, feature_encoders=2
    )
    seed_everything(3)
    alone = build_model(one, None)
    seed_everything(3)
    model = build_model(two, None)
    seed_everything(4)
    next_seed = build_model(make_config(model="cavga-ru", image_size=64, seed=4, channels=1), None)
    assert all(
        torch.equal(v, alone.state_dict()[k])
        for k, v in model.state_dict().items()
        if k in alone.state_dict()
    )
    extra = model.extra_encoders[0].state_dict()
    assert len(model.extra_encoders) == 1 and len(model.extra_encoders[0].layers) == 2  # s4 and s8
    assert extra and all(torch.equal(v, next_seed.encoder.state_dict()[k]) for k, v in extra.items())
    assert not any(p.requires_grad for p in model.extra_encoders.parameters())

    x = torch.rand(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        out, own = forward(model, two, x), model.encoder(standardize(x))
        theirs = model.extra_encoders[0](standardize(x))
    assert set(out.features) == {4, 8, 16, 32}
    for stride, f in out.features.items():
        expected = [own[stride], *([theirs[stride]] if stride in theirs else [])]
        assert torch.equal(f, torch.cat(expected, 1)), stride


def test_each_encoder_pretrains_on_its_own_seed_and_a_stopped_run_resumes(
    data: Path, tmp_path: Path, monkeypatch, capsys, keep_any, ctrl_c
) -> None:
    """Two encoders, 3 pre-training steps each: each one's stages move from where they started, each
    in its own log with its own losses (the extra one's head, batches and synthetic anomalies come
    from the next seed); the CAVGA steps leave both as they are. A run stopped during the second
    encoder's pre-training resumes to the weights of one that was never stopped."""
    base = ["--model", "cavga-ru", "--image-size", str(TINY_SIZE), "--batch-size", "4"]
    base += [
        "--pretrain-steps",
        "3",
        "--feature-encoders",
        "2",
        "--quiet",
        "--device",
        "cpu",
        "--data",
        str(data),
    ]
    initial: dict = {}
    real_pretrain = train_mod.pretrain

    def pretrain_after_a_copy(model, *args):
        if not initial:
            initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_pretrain(model, *args)

    monkeypatch.setattr(train_mod, "pretrain", pretrain_after_a_copy)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *base, "--steps", "1", "--out", str(one)]) == 0
    monkeypatch.setattr(train_mod, "pretrain", real_pretrain)
    assert main(["train", *base, "--steps", "2", "--out", str(two)]) == 0
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["pretrain"]["step"] == a["pretrain_extra"][0]["step"] == 3
    stages = ("encoder.stem.", "encoder.layers.0.", "encoder.layers.1.", "extra_encoders.0.")
    for prefix in stages:
        assert not all(torch.equal(v, a["model"][k]) for k, v in initial.items() if k.startswith(prefix))
        assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items() if k.startswith(prefix))
    assert not torch.equal(
        a["model"]["encoder.layers.2.0.conv1.weight"], b["model"]["encoder.layers.2.0.conv1.weight"]
    )

    def losses(log: Path) -> list[str]:
        return [line.split(",")[1] for line in log.read_text().splitlines()[1:]]

    assert len(losses(one / "pretrain_log_2.csv")) == 3
    assert losses(one / "pretrain_log_2.csv") != losses(one / "pretrain_log.csv")
    assert '"pretrain_extra"' in (one / "train_summary.json").read_text()

    # Ctrl-C as the second encoder's second step begins (the fifth synthetic batch of the run).
    part = tmp_path / "part"
    real_synthesize = ctrl_c_at_synthetic_batch(monkeypatch, 5)
    assert main(["train", *base, "--steps", "1", "--out", str(part)]) == 2
    assert "interrupted at pre-training step 2/3" in capsys.readouterr().err
    saved = load_checkpoint(part)
    assert saved["pretrain"]["step"] == 3 and saved["pretrain_extra"][0]["step"] == 2
    monkeypatch.setattr(train_mod, "synthesize", real_synthesize)
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    c = load_checkpoint(part)
    assert all(torch.equal(v, c["model"][k]) for k, v in a["model"].items())
    assert (part / "pretrain_log_2.csv").read_text().count("\n") == 4  # header + 3 steps


def test_extra_encoders_need_a_random_resnet(data: Path, tmp_path: Path, capsys) -> None:
    """Extra encoders on a DCGAN model, or beside pre-trained weights, stop before any work."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--image-size", str(TINY_SIZE), "--feature-encoders", "2"]
    assert main([*args, "--model", "cavga-du", "--out", str(out), "--quiet"]) == 2
    assert "for a ResNet model from random weights, not cavga-du" in capsys.readouterr().err
    with pytest.raises(RunError, match="with weights"):
        build_model(make_config(feature_encoders=2, weights="w.pt", channels=1), None)
    assert not out.exists()
