"""The engine's contract (shared/spec/dynamics.md) for every registered model, on random weights.

tests/test_engine.py checks the dynamics in depth on pvgg16 and peffnetb0; this file holds every model
of ``pctune.list_models()`` to the properties any predictive network must have, so that a model added to
the zoo is checked without writing a test for it: timestep 0 is the plain backbone, the feedforward
coefficients keep every timestep there, the output is [T+1, B, classes], a batch equals its images run
one by one, each decoder predicts what its encoder read, and the presets fit the pcoders.

Small inputs keep it cheap on a CPU: the model's own input size when it is small (the demo's 16x16),
32x32 otherwise.
"""

import math

import pytest
import torch

import pctune
from pctune import Hyperparameters

T = 2
BATCH = 2


def _randomize_batchnorm(module: torch.nn.Module) -> None:
    """Fresh BatchNorm statistics are the identity; make them non-trivial so tests can see mistakes
    (a head or an encoder cut that skips a BatchNorm would otherwise go unnoticed)."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _input_shape(net) -> tuple[int, int, int]:
    channels, height, width = net.input_size
    return (channels, height, width) if max(height, width) <= 64 else (channels, 32, 32)


def _strong_hparams(net) -> Hyperparameters:
    """Coefficients under which every term of the update matters: feedforward drive, feedback,
    memory and error correction (alpha large enough to move unscaled representations)."""
    n = net.num_pcoders
    gen = torch.Generator().manual_seed(n)
    beta = (0.2 + 0.5 * torch.rand(n, generator=gen)).tolist()
    alpha = 0.05 if net.gradient_scaling else 50.0
    return Hyperparameters(beta, [(1 - b) * 0.5 for b in beta], [alpha] * n)


def _close(a, b, rtol=1e-5) -> bool:
    scale = b.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item() <= rtol


class Case:
    """One model with its input and one run of the full dynamics, shared by the tests of that model."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.name = name
        self.net = pctune.create_model(name)  # pretrained=False: random weights, no download
        _randomize_batchnorm(self.net)
        self.x = torch.randn(BATCH, *_input_shape(self.net), generator=torch.Generator().manual_seed(2))
        self.hp = _strong_hparams(self.net)
        self.logits = self.net.run(self.x, T, self.hp)
        with torch.no_grad():
            self.backbone = self.net.backbone(self.x)


@pytest.fixture(scope="module", params=pctune.list_models())
def case(request):
    return Case(request.param)


def test_every_registered_model_is_covered():
    assert {"demo", "pvgg16", "peffnetb0", "presnet18"} <= set(pctune.list_models())


def test_output_is_timesteps_by_batch_by_classes(case):
    classes = case.backbone.shape[-1]
    assert case.logits.shape == (T + 1, BATCH, classes)
    assert case.logits.dtype == torch.float32
    assert torch.isfinite(case.logits).all()


def test_timestep_zero_is_the_plain_backbone(case):
    assert torch.equal(case.logits[0], case.backbone)
    assert torch.equal(case.net(case.x), case.backbone)  # forward() is the plain network too
    # the coefficients are strong enough for the later timesteps to differ, or the tests below test nothing
    for t in range(1, T + 1):
        assert not torch.equal(case.logits[t], case.logits[0]), f"{case.name}: t={t} equals t=0"


def test_feedforward_coefficients_keep_every_timestep_at_zero(case):
    n = case.net.num_pcoders
    hp = Hyperparameters([1.0] * n, [0.0] * n, [0.0] * n)
    logits = case.net.run(case.x, T, hp)
    assert logits.shape == (T + 1, BATCH, case.backbone.shape[-1])
    assert torch.equal(logits[0], case.backbone)
    for t in range(1, T + 1):
        assert torch.equal(logits[t], logits[0]), f"{case.name}: t={t} moved under beta=1, lambda=0, alpha=0"
    assert case.net.hyperparameters("feedforward") == hp


def test_a_batch_gives_the_logits_of_its_images_one_by_one(case):
    single = torch.cat([case.net.run(case.x[i : i + 1], T, case.hp) for i in range(BATCH)], dim=1)
    assert single.shape == case.logits.shape
    assert _close(case.logits, single), f"{case.name}: batch and image-by-image logits differ"


def test_each_decoder_predicts_the_input_of_its_encoder(case):
    net = case.net
    assert len(net.encoders) == len(net.decoders) == len(net.encoder_modules) == net.num_pcoders >= 1
    below = case.x[:1]
    with torch.no_grad():
        for n, (encoder, decoder) in enumerate(zip(net.encoders, net.decoders, strict=True), start=1):
            rep = encoder(below)
            assert decoder(rep).shape == below.shape, f"{case.name}: pcoder{n}'s decoder"
            below = rep


def test_every_preset_fits_the_pcoders(case):
    net = case.net
    assert "default" in net.presets
    for preset in net.presets:
        hp = net.hyperparameters(preset)
        assert hp.num_pcoders == net.num_pcoders, f"{case.name}: preset {preset!r}"
        assert len(hp.beta) == len(hp.lambda_) == len(hp.alpha) == net.num_pcoders
        for n, (b, lam, a) in enumerate(hp.triples(), start=1):
            where = f"{case.name}: preset {preset!r}: pcoder{n}"
            assert all(math.isfinite(v) for v in (b, lam, a)), where
            assert b >= 0 and lam >= 0 and a >= 0, where
            assert b + lam <= 1 + 1e-9, where
