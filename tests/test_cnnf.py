"""The CNN-F engine (pctune.pc.cnnf, issue 26): its layers on hand-made tensors, the plain CNN at
iteration 0, one training step's losses computed by hand, and the paper's MNIST architecture."""

import math

import pytest
import torch
import torch.nn.functional as F

from pctune.pc.cnnf import CNNF, Block, ada_pool, ada_relu, cnnf_losses, instance_norm, unpool

#: the authors' 28x28 grey architecture (4 conv + 3 FC; Appendix B.1's layer types)
MNIST_BLOCKS = [Block("conv", 1, 16, norm=True), Block("conv", 16, 32, norm=True),
                Block("conv", 32, 32, norm=True, pool=2), Block("conv", 32, 64, norm=True, pool=2),
                Block("linear", 64 * 7 * 7, 1000), Block("linear", 1000, 128), Block("linear", 128, 10, relu=False)]


def test_the_instance_norm_divides_by_the_root_mean_square_without_centring():
    x = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
    assert torch.allclose(instance_norm(x), torch.tensor([[[[1.2, 1.6], [0.0, 0.0]]]]))
    assert torch.allclose(instance_norm(torch.full((1, 1, 2, 2), 2.0)), torch.ones(1, 1, 2, 2))
    assert torch.allclose(instance_norm(-3 * x), -instance_norm(x))


def test_ada_relu_is_relu_first_then_keeps_the_units_whose_sign_agrees_with_the_feedback():
    out, mask = ada_relu(torch.tensor([-1.0, 2.0]), None)
    assert out.tolist() == [0.0, 2.0] and mask.tolist() == [False, True]
    # the sign rule (Theorem 2.1 C): ReLU(f) where g > 0, -ReLU(-f) = min(f, 0) where g < 0
    f = torch.tensor([-2.0, 3.0, -2.0, 3.0])
    out, _ = ada_relu(f, torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert out.tolist() == [0.0, 3.0, -2.0, 0.0]
    # with the residual parameter the value is first blended towards g: f + 0.1 (g - f)
    out, mask = ada_relu(torch.tensor([-0.05, 2.0, 3.0, 4.0]), torch.tensor([1.0, -1.0, 1.0, 0.0]), res=0.1)
    assert torch.allclose(out, torch.tensor([0.055, 0.0, 2.8, 0.0])) and mask.tolist() == [True, False, True, False]


def test_ada_pool_takes_the_max_first_then_the_max_or_min_by_the_feedbacks_sign_and_unpools_there():
    window = torch.tensor([[[[1.0, 3.0], [-2.0, 0.0]]]])
    top, state = ada_pool(window, None, 2)
    assert top.item() == 3.0
    assert unpool(torch.full((1, 1, 1, 1), 7.0), state, 2).tolist() == [[[[0.0, 7.0], [0.0, 0.0]]]]
    low, state = ada_pool(window, torch.full((1, 1, 1, 1), -1.0), 2)
    assert low.item() == -2.0
    assert unpool(torch.full((1, 1, 1, 1), 5.0), state, 2).tolist() == [[[[0.0, 0.0], [5.0, 0.0]]]]
    assert ada_pool(window, torch.zeros(1, 1, 1, 1), 2)[0].item() == 0.0
    high, _ = ada_pool(window, torch.ones(1, 1, 1, 1), 2)
    assert high.item() == 3.0


def test_the_feedback_runs_the_same_weights_transposed():
    net = CNNF([Block("conv", 3, 5, padding=1), Block("linear", 5 * 6 * 6, 4, relu=False)])
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    conv = F.conv2d(x, net.weights[0], padding=1)
    assert torch.allclose((conv * y).sum(), (net._transposed_map(y, 0, x.shape) * x).sum(), rtol=1e-5)
    z, v = torch.randn(2, 4), torch.randn(2, 5, 6, 6)
    back = net._transposed_map(z, 1, v.shape)
    assert back.shape == v.shape
    assert torch.allclose((F.linear(v.flatten(1), net.weights[1]) * z).sum(), (back * v).sum(), rtol=1e-5)


def _plain_cnn(net: CNNF, x: torch.Tensor) -> torch.Tensor:
    """The same weights as a standard CNN, written out: conv, instance norm, bias, ReLU, MaxPool, FC."""
    for block, weight, bias in zip(net.blocks, net.weights, net.biases, strict=True):
        x = F.conv2d(x, weight, padding=block.padding) if block.kind == "conv" else x.flatten(1) @ weight.T
        if block.norm:
            x = x / torch.sqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-8)
        x = x + bias
        x = F.relu(x) if block.relu else x
        x = F.max_pool2d(x, block.pool) if block.pool else x
    return x


@pytest.mark.parametrize("ind", [0, 2, 4])
def test_iteration_zero_is_the_plain_cnn_with_the_same_weights(ind):
    torch.manual_seed(0)
    net = CNNF(MNIST_BLOCKS, ind=ind, res=0.1)
    with torch.no_grad():
        for bias in net.biases:
            bias.normal_()
    x = torch.randn(3, 1, 28, 28)
    out = net.iterate(x, 2)
    assert torch.equal(out.logits[0], _plain_cnn(net, x)) and torch.equal(net(x), out.logits[0])
    assert len(out.logits) == 3 and len(out.reconstructions) == 2
    assert all(r.shape == out.target.shape for r in out.reconstructions)
    assert not torch.allclose(out.logits[1], out.logits[0]), "the feedback changes the later iterations"


def test_one_training_step_s_losses_match_a_hand_computation():
    """Two linear blocks (ReLU after the first), feedback to the input (ind = 0), res = 0.5, one iteration.

    Plain pass: W1 x = [-1, 2.5] -> ReLU [0, 2.5] (mask [0, 1]) -> logits0 = W2 [0, 2.5] = [2.5, 5].
    Feedback: logits0 W2 = [2.5, 12.5] (the ReLU's g), masked [0, 12.5], times W1: the reconstruction
    [6.25, 12.5]; the next input x + 0.5 (r - x) = [3.625, 7.25]. W1 of it = [-3.625, 9.0625], blended
    towards g: [-0.5625, 10.78125]; unit 0 disagrees with g in sign: [0, 10.78125]; logits1 = [10.78125, 21.5625]."""
    net = CNNF([Block("linear", 2, 2), Block("linear", 2, 2, relu=False)], ind=0, res=0.5)
    with torch.no_grad():
        net.weights[0].copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0]]))
        net.weights[1].copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    out = net.iterate(torch.tensor([[1.0, 2.0]]), 1)
    assert torch.allclose(out.logits[0], torch.tensor([[2.5, 5.0]]))
    assert torch.allclose(out.reconstructions[0], torch.tensor([[6.25, 12.5]]))
    assert torch.allclose(out.logits[1], torch.tensor([[10.78125, 21.5625]]))
    losses = cnnf_losses(out, torch.tensor([1]), reconstruction_weight=0.1)
    ce = (math.log1p(math.exp(-2.5)) + math.log1p(math.exp(-10.78125))) / 2
    mse = (5.25 ** 2 + 10.5 ** 2) / 2
    assert losses["cross_entropy"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["reconstruction"].item() == pytest.approx(mse, rel=1e-6)
    assert losses["total"].item() == pytest.approx(ce + 0.1 * mse, rel=1e-6)
    losses["total"].backward()  # the gradient flows through the iteration into both weights
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in net.weights)


def test_a_feedback_layer_outside_the_network_is_refused():
    with pytest.raises(ValueError, match="ind = 7"):
        CNNF(MNIST_BLOCKS, ind=7)


@pytest.mark.parametrize("name", ["cnnf_mnist", "cnnf_demo"])
def test_the_registered_cnnf_specs_build_and_iterate(name):
    from pctune.models.cnnf import create_cnnf, get_cnnf_spec

    spec = get_cnnf_spec(name)
    net = create_cnnf(spec)
    out = net.iterate(torch.randn(2, *spec.input_size), 2)
    assert [tuple(l.shape) for l in out.logits] == [(2, spec.num_classes)] * 3
    assert out.reconstructions[0].shape == out.target.shape


def test_the_mnist_spec_is_the_authors_architecture():
    from pctune.models.cnnf import get_cnnf_spec

    assert list(get_cnnf_spec("cnnf_mnist").blocks) == MNIST_BLOCKS


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["blocks"][1].update(conv=[8, 32]), "blocks[1]: conv takes 8 channels but receives 16"),
    (lambda d: d["blocks"][3].update(linear=[500, 64]), "blocks[3]: linear takes 500 features but receives 512"),
    (lambda d: d["blocks"][0].update(colour=1), "blocks[0]: unknown key(s) colour"),
    (lambda d: d.update(ind=9), "ind = 9: a block index, 0..4"),
    (lambda d: d["blocks"][4].update(pool=2), "blocks[4]: norm and pool apply to conv blocks only"),
])
def test_a_spec_that_does_not_chain_is_one_line_naming_the_block(change, message):
    import copy

    from pctune import PctuneError
    from pctune.models.cnnf import SPEC_DIR, cnnf_spec_from_mapping
    from pctune.models.spec import read_toml

    data = copy.deepcopy(read_toml(SPEC_DIR / "cnnf_demo.toml"))
    change(data)
    with pytest.raises(PctuneError) as info:
        cnnf_spec_from_mapping(data, "my.toml")
    assert str(info.value).startswith(f"my.toml: {message}")


def test_pctune_models_lists_both_families(capsys):
    from pctune.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("predify: ") and "\ncnnf: " in out
    assert "\npvgg16       5 pcoders" in out and "\ncnnf_demo    5 blocks" in out and "\ncnnf_mnist   7 blocks" in out
