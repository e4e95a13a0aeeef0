"""Every registered network: shapes, gradients, size checks and ResNet-18 weight files."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision

from cavga.attention import attention_expansion_loss, latent_attention
from cavga.config import make_config
from cavga.engine.run import build_model
from cavga.errors import CavgaError
from cavga.losses import classifier_loss, kl_divergence, reconstruction_loss
from cavga.networks import MODELS, create_model
from cavga.networks.blocks import FlatLatent
from cavga.networks.resnet import ResNet18Trunk

INVALID_SIZES = {"resnet": [16, 40, 48], "dcgan": [16, 48, 96], "raw": [8, 24, 40]}
TRAINABLE = sorted(n for n, s in MODELS.items() if s.setting != "training-free")
ANCHORS = sorted(n for n, s in MODELS.items() if s.setting == "training-free")


def _grid(name: str, size: int) -> int:
    return size // 32 if MODELS[name].backbone == "resnet" else 4


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", TRAINABLE)
def test_forward_shapes_and_finite_generator_gradients(name, channels, size):
    """A conv z keeps the h×w grid of F, a flattened one is 100-d; x̂ has x's shape in [0, 1]; Dis
    gives (B,) and C (B, 2) where the model has them; the full generator loss reaches every
    generator parameter with finite gradients and none of the discriminator's."""
    torch.manual_seed(0)
    model = create_model(name, size, channels)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    g = _grid(name, size)
    assert out.F.shape[0] == 2 and out.F.shape[2:] == (g, g)
    assert out.z.shape == out.mu.shape
    assert out.z.shape == ((2, 100) if isinstance(model.latent, FlatLatent) else (2, out.z.shape[1], g, g))
    assert (out.logvar is None) == (MODELS[name].family == "baseline" and name.startswith("ae-"))
    assert out.F is out.features[max(out.features)]
    assert out.recon.shape == out.logits.shape == x.shape
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    torch.testing.assert_close(out.recon, torch.sigmoid(out.logits))
    assert (model.discriminator is None) == (MODELS[name].family == "baseline")
    if model.discriminator is not None:
        assert model.discriminator(x).shape == (2,)
    weak = MODELS[name].setting in ("weakly-supervised", "self-supervised")  # both have C
    assert (out.class_logits is not None) == weak
    loss = reconstruction_loss(out.logits, x) + attention_expansion_loss(latent_attention(out))
    if out.logvar is not None:
        loss = loss + kl_divergence(out.mu, out.logvar)
    if weak:
        loss = loss + classifier_loss(out.class_logits, torch.tensor([0, 1]))
    loss.backward()
    for p in model.generator_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if model.discriminator is not None:
        assert all(p.grad is None for p in model.discriminator.parameters())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ANCHORS)
def test_anchors_are_raw_patches_of_the_standardised_image_and_learn_nothing(name, channels, size):
    """An anchor has no parameters and reconstructs nothing (x̂ = x); its one feature map holds, at each
    position, the p×p patch (p = size/16, at least 4; stride p/2) of the image standardised to zero
    mean and unit variance, which does not change with the image's brightness or contrast."""
    model = create_model(name, size, channels)
    assert list(model.parameters()) == [] and model.generator_parameters() == []
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.recon is x and out.logvar is None and out.class_logits is None
    p = max(4, size // 16)
    (stride,) = out.features
    assert stride == p // 2 and out.F.shape == (2, channels * p * p, size // stride, size // stride)
    xs = (x - x.flatten(1).mean(1).view(-1, 1, 1, 1)) / (x.flatten(1).std(1).view(-1, 1, 1, 1) + 1e-6)
    # Position (1, 1) covers rows and columns stride − p/4 … stride − p/4 + p − 1 (padding p/4).
    r = stride - p // 4
    patch = xs[:, :, r : r + p, r : r + p].reshape(2, -1)
    torch.testing.assert_close(out.F[:, :, 1, 1], patch)
    torch.testing.assert_close(model(0.5 * x + 0.2).F, out.F, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sampling_follows_training_mode(name):
    """z = μ at inference, z ≠ μ while training (a plain autoencoder's code is always μ), and
    `sample=` overrides the mode."""
    torch.manual_seed(0)
    model = create_model(name, 32, 1)
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    assert torch.equal(out.z, out.mu) == (out.logvar is None)
    out = model(x, sample=False)
    assert torch.equal(out.z, out.mu)
    model.eval()
    assert torch.equal(model(x).z, model(x).mu)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_invalid_image_sizes_raise(name):
    """Sizes the encoder stack cannot reduce to its grid are refused with a CavgaError naming the size."""
    for size in INVALID_SIZES[MODELS[name].backbone]:
        with pytest.raises(CavgaError, match=str(size)):
            create_model(name, size, 1)


def test_unknown_model_raises():
    """An unknown name is a CavgaError that lists the registered models."""
    with pytest.raises(CavgaError, match="cavga-ru"):
        create_model("cavga-xx", 32, 1)


def test_generator_parameters_exclude_the_discriminator():
    """The generator optimizer gets E, the latent heads and G, never Dis."""
    model = create_model("cavga-du", 32, 1)
    gen = {id(p) for p in model.generator_parameters()}
    dis = {id(p) for p in model.discriminator.parameters()}
    assert gen.isdisjoint(dis)
    assert gen | dis == {id(p) for p in model.parameters()}


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("seed", [0, 5])
def test_resnet18_trunk_is_torchvisions_network(seed):
    """`ResNet18Trunk` is torchvision's resnet18 up to layer4: same state-dict keys, the same seeded
    weights, the random stream left where torchvision leaves it, and the same features."""
    torch.manual_seed(seed)
    ref = torchvision.models.resnet18(weights=None).eval()
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    ours = ResNet18Trunk().eval()
    assert torch.equal(torch.rand(3), after_ref)
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert list(ours.state_dict()) == list(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = [
            ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))),
            ours.maxpool(ours.relu(ours.bn1(ours.conv1(x)))),
        ]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            feats = [getattr(ref, name)(feats[0]), getattr(ours, name)(feats[1])]
    torch.testing.assert_close(feats[1], feats[0], atol=0, rtol=0)


def _path_error(path) -> str:
    return re.escape(str(path))


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet_state_dict_file_loads(tmp_path, resnet_state, channels):
    """A torchvision ResNet-18 state dict is loaded exactly, for grey and colour input alike."""
    path = tmp_path / "r18.pt"
    torch.save(resnet_state, path)
    enc = create_model("cavga-ru", 32, channels, weights=str(path)).encoder
    torch.testing.assert_close(enc.stem[0].weight, resnet_state["conv1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(enc.stem[1].running_var, resnet_state["bn1.running_var"], atol=0, rtol=0)
    last = enc.layers[3][1].conv2.weight
    torch.testing.assert_close(last, resnet_state["layer4.1.conv2.weight"], atol=0, rtol=0)


def test_grey_image_is_seen_as_its_rgb_copy():
    """The R encoder gives a grey image exactly the features of the same image in RGB."""
    torch.manual_seed(0)
    grey = create_model("cavga-ru", 32, 1).encoder.eval()
    rgb = create_model("cavga-ru", 32, 3).encoder.eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(grey(x)[32], rgb(x.repeat(1, 3, 1, 1))[32])


def test_resnet_state_dict_variants_load(tmp_path, resnet_state):
    """A checkpoint wrapped in {"state_dict": …}, with DataParallel's "module." prefix and no fc loads."""
    sd = {f"module.{k}": v for k, v in resnet_state.items() if not k.startswith("fc.")}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    enc = create_model("cavga-ru", 32, 3, weights=str(path)).encoder
    torch.testing.assert_close(enc.layers[0][0].conv1.weight, resnet_state["layer1.0.conv1.weight"])


def test_weights_file_with_wrong_keys_raises(tmp_path):
    """A state dict of another network is refused, naming the file and a missing key."""
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(CavgaError, match=_path_error(path)) as info:
        create_model("cavga-ru", 32, 1, weights=str(path))
    assert "missing" in str(info.value) and "conv1.weight" in str(info.value)


def test_weights_file_with_wrong_shapes_raises(tmp_path, resnet_state):
    """A ResNet-18 layout with a wrongly shaped tensor is refused, naming the file and the key."""
    sd = dict(resnet_state)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad_shape.pt"
    torch.save(sd, path)
    with pytest.raises(CavgaError, match=_path_error(path)) as info:
        create_model("cavga-ru", 32, 3, weights=str(path))
    assert "wrong shape" in str(info.value) and "layer1.0.conv1.weight" in str(info.value)


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"this is not a checkpoint", "cannot read"), (None, "does not hold a state dict")],
)
def test_unreadable_weights_files_raise(tmp_path, content, kind):
    """Garbage bytes and a saved non-dict object both give a CavgaError naming the file."""
    path = tmp_path / "weights.pt"
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CavgaError, match=_path_error(path)) as info:
        create_model("cavga-ru", 32, 1, weights=str(path))
    assert kind in str(info.value)


def test_missing_weights_file_raises(tmp_path):
    """A weights path that does not exist is a CavgaError naming it."""
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CavgaError, match=_path_error(path)):
        create_model("cavga-ru", 32, 1, weights=str(path))


def test_weights_are_refused_for_dcgan_models(tmp_path):
    """Only the ResNet-18 encoder takes weights; a DCGAN model with weights= is a CavgaError."""
    with pytest.raises(CavgaError, match="ResNet-18"):
        create_model("cavga-du", 32, 1, weights=str(tmp_path / "r18.pt"))


@pytest.mark.parametrize("name", ["cavga-ru", "cavga-du"])
def test_built_models_run_channels_last_and_compute_what_the_plain_layout_does(name):
    """`build_model` gives channels-last convolution weights (the faster layout on CPUs); the outputs
    are those of the same weights in the plain layout, to float rounding."""
    cfg = make_config(model=name, image_size=32, channels=1)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert any(not w.is_contiguous() for w in convs)  # so the two layouts really differ
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = model(x, sample=False), plain(x, sample=False)
    torch.testing.assert_close(a.recon, b.recon, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.mu, b.mu, atol=1e-5, rtol=1e-4)
