"""A precomputed timestep 0 (``PredictiveNet.timestep_zero``, ``run(..., start=...)``): bit-identical
results for every pattern of coefficients, never modified by the runs that use it, actually used."""

import itertools

import pytest
import torch
from torch import nn

import pctune
from pctune import Hyperparameters
from pctune.pc.start import TimestepZero


def _patterns(n: int, big_alpha: bool) -> list:
    """Presets and coefficients with beta, lambda and alpha zero or not per pcoder (every alpha mask)."""
    scale = 100.0 if big_alpha else 1.0  # unscaled gradients are small: alpha must be large to matter
    out: list = ["default", "feedforward"]
    betas = [[0.6, 0.0, 1.0], [0.0, 0.5, 0.3], [0.0, 0.0, 0.7]]
    for i, mask in enumerate(itertools.product([0, 1], repeat=n)):
        beta = betas[i % len(betas)][:n] + [0.5] * max(0, n - 3)
        lam = [0.0 if (i + k) % 3 == 0 else round((1 - b) * 0.5, 3) for k, b in enumerate(beta)]
        alpha = [m * scale * (0.01 + 0.02 * k) for k, m in enumerate(mask)]
        out.append(Hyperparameters(beta, lam, alpha))
    out.append(Hyperparameters(0.0, 0.0, 0.0))  # memory only
    out.append(Hyperparameters(0.0, 0.5, 0.0))  # no feedforward drive
    return out


def _assert_identical(got, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        return
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.reconstructions, expected.reconstructions)
    assert torch.equal(got.errors, expected.errors)
    assert (got.representations is None) == (expected.representations is None)
    for step_got, step_expected in zip(got.representations or [], expected.representations or [], strict=True):
        for a, b in zip(step_got, step_expected, strict=True):
            assert torch.equal(a, b)


def _snapshot(start: TimestepZero) -> list:
    return [(t, t.clone(), t._version) for t in start.tensors()]


def _assert_unchanged(snapshot) -> None:
    for tensor, copy, version in snapshot:
        assert tensor._version == version, "a run modified the start in place"
        assert torch.equal(tensor, copy)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return pctune.create_model("demo")  # random weights, 3 pcoders, 16x16 grey images


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("scaling", [True, False])
def test_demo_runs_from_start_are_bit_identical(demo, scaling, autocast):
    demo.gradient_scaling = scaling
    try:
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        start = demo.timestep_zero(x, autocast=autocast)
        assert (start.scales is not None) == scaling
        snapshot = _snapshot(start)
        moved = 0
        for hp, timesteps in itertools.product(_patterns(3, not scaling), [0, 1, 3]):
            for options in [{}, {"return_states": True}, {"return_representations": True}]:
                expected = demo.run(x, timesteps, hp, autocast=autocast, **options)
                got = demo.run(x, timesteps, hp, autocast=autocast, start=start, **options)
                _assert_identical(got, expected)
            logits = expected.logits
            moved += timesteps > 0 and not torch.equal(logits[-1], logits[0])
        assert moved >= 15, "the dynamics should move the logits in most cases"
        _assert_unchanged(snapshot)
    finally:
        demo.gradient_scaling = True


def test_the_start_is_used(demo):
    """A start that differs from the computed timestep 0 changes the run: the run reads it."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    start = demo.timestep_zero(x)
    plain = demo.run(x, 2, "default", return_states=True)
    assert torch.equal(start.logits, plain.logits[0])
    assert torch.equal(torch.stack(start.errors), plain.errors[0])
    assert torch.equal(start.preds[0], plain.reconstructions[0])
    for field in ("logits", "reps", "grads"):
        changed = start.to("cpu")
        if field == "logits":
            changed.logits = start.logits + 1.0
        else:
            getattr(changed, field)[1] = getattr(start, field)[1] * 1.5 + 0.1
        got = demo.run(x, 2, "default", return_states=True, start=changed)
        assert not torch.equal(got.logits, plain.logits), field


def test_with_the_options_of_optimize(demo):
    """channels_last and autocast chosen by optimize(): the start follows the run's defaults."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    demo.optimize(channels_last=True, autocast=torch.bfloat16)
    try:
        start = demo.timestep_zero(x)
        assert start.autocast is torch.bfloat16 and start.reps[0].is_contiguous(memory_format=torch.channels_last)
        for hp in ["default", Hyperparameters([0.5, 0.0, 0.7], [0.2, 0.5, 0.0], [0.0, 0.05, 0.02])]:
            _assert_identical(demo.run(x, 2, hp, start=start, return_states=True), demo.run(x, 2, hp, return_states=True))
    finally:
        demo.optimize(channels_last=False)


def test_start_is_unchanged_with_an_encoder_that_returns_its_input():
    backbone = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 5))
    torch.manual_seed(0)
    net = pctune.PredictiveNet(backbone, ["0", "2"], [nn.Identity(), nn.ConvTranspose2d(4, 3, 3, 1, 1)])
    x = torch.randn(2, 3, 8, 8)
    start = net.timestep_zero(x)
    assert start.reps[0] is x and start.preds[0] is x  # identity encoder and decoder: shared tensors
    snapshot = _snapshot(start)
    for hp in [Hyperparameters([0.5, 0.6], [0.3, 0.0], [10.0, 10.0]), Hyperparameters(0.0, 0.0, 1.0),
               Hyperparameters([1.0, 0.0], [0.0, 0.0], [5.0, 0.0])]:
        _assert_identical(net.run(x, 3, hp, start=start, return_states=True), net.run(x, 3, hp, return_states=True))
    _assert_unchanged(snapshot)


def test_nbytes_to_and_pin_memory(demo):
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    start = demo.timestep_zero(x)
    tensors = [*start.reps, *start.preds, *start.grads, *start.errors, start.logits]
    assert len(tensors) == 4 * 3 + 1
    assert start.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    # per image: reps 16*16*16 + 32*8*8 + 64*4*4, preds 1*16*16 + 16*16*16 + 32*8*8, grads as reps,
    # 3 errors and 10 logits, float32
    per_image = 2 * (4096 + 2048 + 1024) + (256 + 4096 + 2048) + 3 + 10
    assert start.nbytes() == 4 * 4 * per_image
    half = demo.timestep_zero(x, autocast=torch.bfloat16)
    assert half.autocast is torch.bfloat16 and half.nbytes() < start.nbytes()
    assert half.nbytes() == sum(t.numel() * t.element_size() for t in half.tensors())
    copy = start.to("cpu", non_blocking=True)
    assert all(torch.equal(a, b) for a, b in zip(copy.tensors(), start.tensors(), strict=True))
    if torch.cuda.is_available():
        pinned = start.pin_memory()
        assert all(t.is_pinned() and t.device.type == "cpu" for t in pinned.tensors())
        on_gpu = pinned.to("cuda", non_blocking=True)
        demo.cuda()
        try:
            xg = x.cuda()
            _assert_identical(demo.run(xg, 2, "default", start=on_gpu, return_states=True),
                              demo.run(xg, 2, "default", return_states=True))
        finally:
            demo.cpu()


def test_start_is_rejected_where_it_does_not_fit(demo):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    start = demo.timestep_zero(x)
    for mode in ("exact", "constant-error"):
        with pytest.raises(pctune.PctuneError, match="inference only"):
            demo.run(x, 2, "default", grad_mode=mode, start=start)
    with pytest.raises(pctune.PctuneError, match="does not fit"):
        demo.run(x[:1], 2, "default", start=start)
    with pytest.raises(pctune.PctuneError, match="autocast"):
        demo.run(x, 2, "default", start=start, autocast=torch.bfloat16)


def test_pvgg16_at_64_pixels(pvgg16):
    """Strided decoders (polyphase on a CPU), every kind of pcoder, with and without gradient scaling."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    mixed = Hyperparameters([0.5, 0.0, 1.0, 0.6, 0.3], [0.3, 0.5, 0.0, 0.2, 0.0], [20.0, 0.0, 5.0, 0.0, 50.0])
    try:
        for scaling, hp in [(False, "default"), (False, mixed), (True, "default")]:
            pvgg16.gradient_scaling = scaling
            start = pvgg16.timestep_zero(x)
            snapshot = _snapshot(start)
            expected = pvgg16.run(x, 1, hp, return_states=True)
            assert not torch.equal(expected.logits[1], expected.logits[0])
            _assert_identical(pvgg16.run(x, 1, hp, return_states=True, start=start), expected)
            _assert_unchanged(snapshot)
        # A compiled network predicts with the compiled decoder where it needs no gradient, which may
        # round differently from the plan's prediction the start holds: the eager modules stand in for
        # compiled ones here, and nn.ConvTranspose2d does round differently from the polyphase form.
        pvgg16.gradient_scaling = False
        pvgg16._compiled = (pvgg16.encoders, pvgg16.head, list(pvgg16.decoders))
        start = pvgg16.timestep_zero(x)
        assert not torch.equal(pvgg16.decoders[1](start.reps[1]), start.preds[1])
        expected = pvgg16.run(x, 1, mixed, return_states=True)
        _assert_identical(pvgg16.run(x, 1, mixed, return_states=True, start=start), expected)
    finally:
        pvgg16.gradient_scaling = False
        pvgg16._compiled = None
