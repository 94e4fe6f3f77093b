"""The engine against the contract (shared/spec/dynamics.md) on random-weight networks."""

import pytest
import torch

import pctune
from pctune import Hyperparameters
from tests.reference import reference_run


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item() <= rtol


def _strong_hparams(n, alpha):
    """Coefficients that make every term matter (alpha large enough to move the representation)."""
    gen = torch.Generator().manual_seed(n)
    beta = (0.2 + 0.5 * torch.rand(n, generator=gen)).tolist()
    lam = [(1 - b) * 0.5 for b in beta]
    return Hyperparameters(beta, lam, [alpha] * n)


# Timestep 0 equal to the backbone, the feedforward coefficients, the output shape and batch against
# image-by-image are checked for every registered model at a small input in test_engine_contract.py;
# here at a second input size.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["pvgg16", "peffnetb0"])
def test_timestep_zero_is_the_backbone_at_64_pixels(model, request):
    net = request.getfixturevalue(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(64))
    with torch.no_grad():
        expected = net.backbone(x)
    logits = net.run(x, timesteps=2, hparams="default")
    assert logits.shape == (3, 2, 1000)
    assert torch.equal(logits[0], expected)


# `-m "not slow"` keeps one case per model, with and without gradient scaling.
@pytest.mark.parametrize("model,size,scaling", [
    ("pvgg16", 32, True), ("peffnetb0", 32, False),
    *(pytest.param(model, size, scaling, marks=pytest.mark.slow)
      for model, size, scaling in [("pvgg16", 32, False), ("peffnetb0", 32, True), ("pvgg16", 64, False),
                                   ("pvgg16", 64, True), ("peffnetb0", 64, False), ("peffnetb0", 64, True)]),
])
def test_engine_matches_straightforward_implementation(model, size, scaling, request):
    net = request.getfixturevalue(model)
    net.gradient_scaling = scaling
    try:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        alpha = 0.05 if scaling else 50.0  # unscaled gradients are ~1/K: alpha must be large to matter
        hp = _strong_hparams(net.num_pcoders, alpha)
        scales = net.gradient_scales((3, size, size))
        expected = reference_run(net, x, 3, hp.beta, hp.lambda_, hp.alpha, scales)
        got = net.run(x, timesteps=3, hparams=hp)
        assert not torch.equal(expected[3], expected[0]), "the dynamics should move the logits"
        assert _close(got, expected)
        # the error term must matter, or the comparison would not test it
        no_alpha = reference_run(net, x, 3, hp.beta, hp.lambda_, [0.0] * net.num_pcoders)
        assert not _close(no_alpha, expected, rtol=1e-4)
    finally:
        net.gradient_scaling = False


def test_top_pcoder_lambda_is_ignored(pvgg16):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a = pvgg16.run(x, 2, Hyperparameters([0.5] * 5, [0.2, 0.2, 0.2, 0.2, 0.0], 0.0))
    b = pvgg16.run(x, 2, Hyperparameters([0.5] * 5, [0.2, 0.2, 0.2, 0.2, 0.5], 0.0))
    assert torch.equal(a, b)


def test_return_states_shapes_and_consistency(pvgg16):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    hp = _strong_hparams(5, 50.0)
    result = pvgg16.run(x, 3, hp, return_states=True)
    assert isinstance(result, pctune.RunResult)
    assert result.reconstructions.shape == (4, 2, 3, 32, 32)
    assert result.errors.shape == (4, 5, 2)
    assert torch.equal(result.logits, pvgg16.run(x, 3, hp))
    with torch.no_grad():
        rep = pvgg16.encoders[0](x)
        expected = ((pvgg16.decoders[0](rep) - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(result.errors[0, 0], expected)
    assert torch.allclose(result.reconstructions[0], pvgg16.decoders[0](rep))


@pytest.mark.slow
def test_exact_gradient_mode_matches_finite_differences():
    torch.manual_seed(0)
    net = pctune.create_model("presnet18", num_classes=5).double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hp = Hyperparameters(0.5, 0.3, 0.5)

    def loss(inp):
        return net.run(inp, 2, hp, grad_mode="exact")[-1, 0, 2]

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xg), xg)
    for idx in [(0, 0, 5, 7), (0, 1, 16, 16), (0, 2, 30, 2)]:
        delta = torch.zeros_like(x)
        delta[idx] = 1e-6
        numeric = (loss(x + delta) - loss(x - delta)) / 2e-6
        assert abs(numeric.item() - grad[idx].item()) <= 1e-5 * max(1.0, abs(numeric.item()))
    # the constant-error variant differs: it ignores the second-order term
    xc = x.clone().requires_grad_(True)
    (const,) = torch.autograd.grad(net.run(xc, 2, hp, grad_mode="constant-error")[-1, 0, 2], xc)
    assert not torch.allclose(const, grad)


def test_gradient_scale_is_deterministic_and_analytic(pvgg16):
    pvgg16.gradient_scaling = True
    try:
        scales = pvgg16.gradient_scales((3, 224, 224))
        again = pvgg16.gradient_scales((3, 224, 224))
    finally:
        pvgg16.gradient_scaling = False
    assert scales == again
    # pcoder 1: K = 3*224*224 elements predicted; one element of e_1 reaches a 5x5 window of 3 channels
    assert scales[0] == pytest.approx(3 * 224 * 224 / (5 * 5 * 3) ** 0.5)
    # pcoder 2: ConvTranspose2d(k=10, s=2) reaches 10x10 pixels of 64 channels of a 64x224x224 target
    assert scales[1] == pytest.approx(64 * 224 * 224 / (10 * 10 * 64) ** 0.5)
    assert pvgg16.gradient_scales() == [1.0] * 5


def test_default_decoder_rule_for_a_spec_without_decoders():
    net = pctune.create_model("presnet18")
    first, second = net.decoders[0], net.decoders[1]
    assert isinstance(first[0], torch.nn.Upsample) and first[0].scale_factor == (4.0, 4.0)
    assert (first[1].in_channels, first[1].out_channels, first[1].kernel_size) == (64, 3, (3, 3))
    assert len(second) == 1 and second[0].in_channels == 64  # layer1 keeps the resolution
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.run(x, 1)[0], net.backbone(x))
