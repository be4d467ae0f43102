"""Velocity networks, build_model and the weight EMA."""

import pytest
import torch
from torch import nn

from sdfm.config import ModelConfig
from sdfm.errors import UserError
from sdfm.models import CIFAR10_UNET, EMA, MLP, FlatMLP, UNet, build_model, parameter_count
from sdfm.models.unet import Attention


def _cfg(kind="auto", **kw) -> ModelConfig:
    return ModelConfig(kind=kind, hidden=16, depth=2, channels=8, **kw)


def _inputs(shape, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, generator=g), torch.randn(batch, *shape, generator=g)


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("size", [28, 8])
def test_unet_shapes(size, num_classes):
    model = UNet(in_channels=1, image_size=size, channels=16, channel_mult=(1, 2, 2), num_classes=num_classes)
    t, x = _inputs((1, size, size))
    assert model(t, x).shape == x.shape
    if num_classes:
        labels = torch.tensor([0, 3, 9, num_classes])  # the last one is the null class
        assert model(t, x, labels).shape == x.shape


@pytest.mark.parametrize("num_classes", [0, 10])
def test_mlp_shapes(num_classes):
    model = MLP(dim=5, hidden=32, depth=2, num_classes=num_classes)
    t, x = _inputs((5,))
    assert model(t, x).shape == x.shape
    if num_classes:
        assert model(t, x, torch.tensor([0, 1, 2, 9])).shape == x.shape


def test_labels_change_the_output_and_none_means_null_class():
    torch.manual_seed(0)
    model = MLP(dim=3, hidden=16, depth=2, num_classes=4)
    t, x = _inputs((3,))
    null = torch.full((4,), 4)
    torch.testing.assert_close(model(t, x), model(t, x, null))
    assert not torch.allclose(model(t, x, torch.zeros(4, dtype=torch.long)), model(t, x, null))


def test_unconditional_model_rejects_labels():
    model = MLP(dim=3, hidden=16, depth=1)
    t, x = _inputs((3,))
    with pytest.raises(ValueError, match="num_classes=0"):
        model(t, x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "model, shape",
    [
        (MLP(4, hidden=16, depth=2, num_classes=3, horizon_input=True), (4,)),
        (UNet(1, 8, channels=8, attention_resolutions=(4,), num_classes=3, horizon_input=True), (1, 8, 8)),
    ],
)
def test_gradients_reach_every_parameter(model, shape):
    # Zero-initialized output layers (every U-Net block starts as the identity) block gradients at
    # initialization by design; with random weights every parameter must be connected to the output.
    _perturb(model, 5)
    t, x = _inputs(shape)
    labels = torch.tensor([0, 1, 2, 3])
    model(t, x, labels, horizon=torch.rand(4)).pow(2).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_time_and_horizon_change_the_output():
    model = UNet(1, 8, channels=8, horizon_input=True)
    _perturb(model, 6)
    _, x = _inputs((1, 8, 8))
    assert not torch.allclose(model(torch.zeros(4), x), model(torch.ones(4), x))
    h = torch.full((4,), 0.5)
    assert not torch.allclose(model(torch.zeros(4), x), model(torch.zeros(4), x, horizon=h))
    # No horizon means h = 0: the instantaneous velocity u(x, t, t) = v(t, x).
    torch.testing.assert_close(model(torch.zeros(4), x), model(torch.zeros(4), x, horizon=torch.zeros(4)))
    with pytest.raises(ValueError, match="horizon_input"):
        UNet(1, 8, channels=8)(torch.zeros(4), x, horizon=h)


def test_unet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="too small"):
        UNet(1, 2, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="even channels"):
        UNet(1, 8, channels=7)
    with pytest.raises(ValueError, match="expects x of shape"):
        UNet(1, 8, channels=8)(torch.rand(2), torch.randn(2, 1, 4, 4))


def test_cifar10_unet_is_the_ot_cfm_network():
    """The OT-CFM / TorchCFM CIFAR-10 U-Net (128 channels, multipliers 1-2-2-2, two blocks per level,
    attention at 16x16, dropout 0.1): TorchCFM's UNetModel of that configuration has 35,746,307
    parameters."""
    model = UNet(3, 32, **CIFAR10_UNET)
    assert parameter_count(model) == 35_746_307
    sides = {m.norm.num_channels for m in model.modules() if isinstance(m, Attention)}
    assert sides == {256}  # attention only at the 16x16 level (width 2c) and in the middle
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model.modules())


def test_unet_handles_sides_that_are_not_powers_of_two():
    model = UNet(1, 28, channels=8, channel_mult=(1, 2, 2), attention_resolutions=(14, 7))
    t, x = _inputs((1, 28, 28))
    assert model(t, x).shape == x.shape
    # one block per level on the way down (14, 7), two on the way up (7, 14), and the middle
    assert sum(isinstance(m, Attention) for m in model.modules()) == 2 + 4 + 1


def test_build_model_auto_choice():
    assert isinstance(build_model(_cfg(), (1, 8, 8), 0), UNet)
    assert isinstance(build_model(_cfg(), (2,), 0), MLP)
    flat = build_model(_cfg("mlp"), (1, 8, 8), 10)
    assert isinstance(flat, FlatMLP)
    t, x = _inputs((1, 8, 8))
    assert flat(t, x, torch.tensor([0, 1, 2, 3])).shape == x.shape


def test_build_model_errors():
    with pytest.raises(UserError, match="model.kind='unet' needs image data.*'mlp' or 'auto'"):
        build_model(_cfg("unet"), (2,), 0)
    with pytest.raises(UserError, match="model.kind='transformer'"):
        build_model(_cfg("transformer"), (2,), 0)
    with pytest.raises(UserError, match="square images of side at least 8"):
        build_model(_cfg("unet", channel_mult=[1, 2, 2, 2]), (1, 4, 4), 0)
    with pytest.raises(UserError, match="model.channels"):
        build_model(ModelConfig(kind="unet", channels=12), (1, 8, 8), 0)


def test_output_is_a_function_of_the_weights_and_inputs_alone():
    """Two networks built from different seeds, one loaded with the other's state dict, answer alike:
    no hidden state (random buffers, noise drawn in forward, dropout left on) changes the output."""
    torch.manual_seed(123)
    a = build_model(_cfg(), (1, 8, 8), 10)
    _perturb(a, 7)  # (the U-Net's last layer starts at zero: make the output depend on every weight)
    torch.manual_seed(456)
    b = build_model(_cfg(), (1, 8, 8), 10)
    _perturb(b, 8)
    t, x = _inputs((1, 8, 8), seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    assert not torch.equal(a(t, x, labels), b(t, x, labels))  # the seeds do differ
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    torch.manual_seed(0)
    first = a(t, x, labels)
    torch.manual_seed(1)  # the global generator does not enter either
    torch.testing.assert_close(b(t, x, labels), first, rtol=0, atol=0)


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_lags_a_ramp_by_its_window_and_stays_inside_the_history():
    """A parameter moving at one unit per step is followed at a lag of decay / (1 - decay) steps (the
    mean age of an exponential window: 9 steps for 0.9), and the average never leaves the range of
    the weights it has seen."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9)
    seen = [0.0]
    for step in range(1, 201):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update(model)  # no step: the fixed decay, no warm-up
        seen.append(float(step))
        shadow = float(ema.module.weight)
        assert min(seen) <= shadow <= max(seen)
    assert 200 - float(ema.module.weight) == pytest.approx(9.0, abs=1e-3)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_ema_decay_zero_copies_and_buffers_follow():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.0)
    _perturb(model, 1)
    model(torch.randn(8, 3))  # moves the BatchNorm running statistics
    ema.update(model)
    for name, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], value), name


def test_ema_state_round_trip():
    model = MLP(3, hidden=8, depth=1)
    ema = EMA(model, decay=0.5)
    _perturb(model, 2)
    ema.update(model)
    restored = EMA(MLP(3, hidden=8, depth=1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(MLP(2, hidden=4, depth=1), decay=1.5)


def test_ema_decay_warmup():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    assert ema.decay_at(None) == 0.999
    assert ema.decay_at(1) == 2 / 11 and ema.decay_at(10**6) == 0.999
