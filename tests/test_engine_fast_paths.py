"""The engine's fast paths (graph-free decoder VJPs, polyphase transposed convolutions, in-place
updates, channels_last, autocast) compute what the plain formulation computes."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pctune
from pctune import Hyperparameters
from pctune.pc import fast_decoders
from pctune.pc.fast_decoders import DecoderPlan, _polyphase_kernel
from tests.reference import reference_run


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _autograd_vjp(decoder, rep, target):
    """G = d/d rep of the per-image mean squared error summed over the batch, by autograd."""
    source = rep.detach().requires_grad_(True)
    with torch.enable_grad():
        pred = decoder(source)
        eps = (pred - target).pow(2).flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(eps, source)
    return pred.detach(), grad


@pytest.mark.parametrize("k,s,p", [(14, 2, 6), (10, 2, 4), (4, 2, 1), (9, 3, 3), (6, 3, 2), (5, 1, 2), (3, 2, 1)])
def test_polyphase_transposed_convolution_is_the_same_map(k, s, p):
    torch.manual_seed(k * 10 + s)
    conv = nn.ConvTranspose2d(6, 5, k, s, p).requires_grad_(False)
    x = torch.randn(2, 6, 7, 7)
    step = fast_decoders._ConvTranspose(conv)
    got, _ = step.forward(x, False)
    expected = conv(x)
    assert got.shape == expected.shape
    assert _rel(got, expected) < 1e-5
    uses_polyphase = step._poly is not None
    assert uses_polyphase == (s > 1 and k - 2 * p == s)


def test_polyphase_kernel_rejects_asymmetric_padding():
    assert _polyphase_kernel(torch.randn(2, 3, 3, 3), 2, 0) is None


@pytest.mark.parametrize("decoder", [
    nn.ConvTranspose2d(8, 3, 5, 1, 2),
    nn.Sequential(nn.ConvTranspose2d(8, 3, 14, 2, 6), nn.ReLU()),
    nn.Sequential(nn.ConvTranspose2d(8, 3, 10, 2, 4), nn.ReLU(inplace=True)),
    nn.Sequential(nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.ConvTranspose2d(8, 3, 3, 1, 1)),
    nn.Sequential(nn.Conv2d(8, 6, 3, 2, 1), nn.SiLU(), nn.Upsample(scale_factor=4.0), nn.Conv2d(6, 3, 3, 1, 1),
                  nn.ReLU()),
    nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Identity(), nn.ReLU()),
])
def test_decoder_plan_matches_autograd(decoder):
    torch.manual_seed(0)
    decoder.requires_grad_(False).eval()
    rep = torch.randn(3, 8, 8, 8)
    rep_copy = rep.clone()
    with torch.no_grad():
        size = decoder(rep).shape
    target = torch.randn(size)
    expected_pred, expected_grad = _autograd_vjp(decoder, rep, target)
    plan = DecoderPlan(decoder)
    with torch.no_grad():
        pred, grad, diff = plan.forward_vjp(rep, target, 2.0 / target[0].numel())
        pred_only = plan.forward(rep)
    assert torch.equal(rep, rep_copy), "the representation must not be modified in place"
    assert _rel(pred, expected_pred) < 1e-5
    assert _rel(pred_only, expected_pred) < 1e-5
    assert _rel(diff, expected_pred - target) < 1e-5
    assert expected_grad.abs().max() > 0
    assert _rel(grad, expected_grad) < 1e-5


def test_decoder_plan_follows_weight_changes():
    torch.manual_seed(1)
    decoder = nn.Sequential(nn.ConvTranspose2d(4, 2, 14, 2, 6), nn.ReLU()).requires_grad_(False)
    plan = DecoderPlan(decoder)
    rep = torch.randn(1, 4, 5, 5)
    before = plan.forward(rep)
    with torch.no_grad():
        decoder[0].weight.mul_(-1.5)
        decoder[0].bias.add_(0.3)
    after = plan.forward(rep)
    assert not torch.allclose(before, after)
    assert _rel(after, decoder(rep)) < 1e-5


def _net():
    torch.manual_seed(0)
    return pctune.create_model("pvgg16")


@pytest.fixture(scope="module")
def vgg():
    return _net()


def _hp(n, alpha):
    gen = torch.Generator().manual_seed(n)
    beta = (0.2 + 0.5 * torch.rand(n, generator=gen)).tolist()
    return Hyperparameters(beta, [(1 - b) * 0.5 for b in beta], alpha)


@pytest.mark.parametrize("alpha", [pytest.param(0.0, marks=pytest.mark.slow), 50.0])
def test_inference_equals_the_differentiable_path(vgg, alpha):
    """grad_mode='none' (in-place updates, graph-free VJPs, skipped decoders) against the
    constant-error mode's plain autograd formulation, which has the same value."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x_copy = x.clone()
    hp = _hp(5, alpha)
    fast = vgg.run(x, 3, hp)
    assert torch.equal(x, x_copy), "run must not modify its input"
    plain = vgg.run(x, 3, hp, grad_mode="constant-error").detach()
    assert not torch.equal(fast[3], fast[0])
    assert _rel(fast, plain) < 1e-5
    if alpha:
        no_alpha = vgg.run(x, 3, _hp(5, 0.0))
        assert _rel(no_alpha, fast) > 1e-4, "the error term must matter for this test to test it"


@pytest.mark.parametrize("hp", [
    Hyperparameters(0.0, 0.5, 0.0),  # no feedforward drive
    Hyperparameters(0.0, 0.0, 0.0),  # memory only
    Hyperparameters([0.5, 0.0, 1.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 20.0, 0.0, 5.0, 0.0]),
])
def test_degenerate_coefficients(vgg, hp):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    hp = hp.for_pcoders(5)
    expected = reference_run(vgg, x, 2, hp.beta, hp.lambda_, hp.alpha)
    assert _rel(vgg.run(x, 2, hp), expected) < 1e-5


def test_encoder_returning_its_input_is_not_modified_in_place():
    backbone = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 5))
    torch.manual_seed(0)
    net = pctune.PredictiveNet(backbone, ["0", "2"], [nn.Conv2d(3, 3, 1), nn.ConvTranspose2d(4, 3, 3, 1, 1)])
    x = torch.randn(2, 3, 8, 8)
    x_copy = x.clone()
    hp = Hyperparameters([0.5, 0.6], [0.3, 0.0], [10.0, 10.0])
    got = net.run(x, 3, hp)
    assert torch.equal(x, x_copy)
    assert _rel(got, reference_run(net, x_copy, 3, hp.beta, hp.lambda_, hp.alpha)) < 1e-5


@pytest.mark.slow
def test_channels_last_keeps_the_numbers():
    net = _net()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    hp = _hp(5, 50.0)
    expected = net.run(x, 2, hp, return_states=True)
    net.optimize(channels_last=True)
    assert net.decoders[4][0].weight.is_contiguous(memory_format=torch.channels_last)
    got = net.run(x, 2, hp, return_states=True)
    net.optimize(channels_last=False)
    assert net.decoders[4][0].weight.is_contiguous()
    for a, b in [(got.logits, expected.logits), (got.reconstructions, expected.reconstructions),
                 (got.errors, expected.errors)]:
        assert _rel(a, b) < 1e-5


@pytest.mark.slow
def test_autocast_is_close_and_returns_float32(vgg):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    hp = _hp(5, 0.0)
    full = vgg.run(x, 2, hp)
    half = vgg.run(x, 2, hp, autocast=torch.bfloat16)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full), "autocast should actually run in reduced precision"
    assert _rel(half, full) < 5e-2
    assert F.cross_entropy(half[1], full[1].argmax(1)).isfinite()


def test_optimize_rejects_unknown_autocast_dtype():
    net = pctune.PredictiveNet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), ["0"], [nn.ConvTranspose2d(2, 1, 3)])
    with pytest.raises(pctune.PctuneError):
        net.optimize(autocast=torch.float64)
