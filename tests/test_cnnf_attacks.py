"""CNN-F under pctune's adversarial stage (issue 26): the stage attacks a CNN-F through the same
``run`` contract as a Predify network, end to end through the unrolled iterations and by transfer
from the plain pass (the paper's two ways). A CNN-F trained briefly on the digits demo (seconds)."""

import pytest
import torch

from pctune.data.demo import digits, digits_normalization
from pctune.evaluate.adversarial import AttackPayload, AttackSpec, Shard, run_shard, select_images
from pctune.models.cnnf import create_cnnf
from pctune.pc.cnnf import train_epoch

T = 2
EPSILONS = [1e-6, 0.03, 0.1, 0.3]  # the stage takes positive epsilons: 1e-6 moves no pixel by a grey level


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = create_cnnf("cnnf_demo")
    images, labels = digits("train")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    for epoch in range(3):
        train_epoch(net, optimizer, images, labels, iterations=1, generator=torch.Generator().manual_seed(epoch))
    net.eval()
    pixels, test_labels = digits("test", normalize=False)
    mean, std = digits_normalization()
    return net, pixels, test_labels, [mean], [std]


def _payload(trained, count=24):
    net, pixels, labels, mean, std = trained
    idx, targets = select_images(net, None, pixels, labels, mean, std, T, count, seed=0)
    return AttackPayload(net, None, pixels[idx], labels[idx], targets, pixels, mean, std, T,
                         [AttackSpec("bim", EPSILONS, steps=10)])


def test_the_trained_cnnf_classifies_the_digits_at_every_iteration(trained):
    net, pixels, labels, mean, std = trained
    x = (pixels - mean[0]) / std[0]
    accuracy = (net.run(x, T).argmax(-1) == labels).float().mean(dim=1)
    assert (accuracy > 0.8).all(), accuracy


@pytest.mark.parametrize("mode", ["exact", "transfer"])
def test_an_attack_s_success_grows_with_epsilon_and_is_nothing_at_a_vanishing_one(trained, mode):
    setup = _payload(trained)
    shard = run_shard(setup, Shard("bim", mode, T, 0, len(setup.labels)))
    for t, rows in shard["success"].items():
        rates = [sum(row) / len(row) for row in rows]
        assert rates[0] == 0.0, (mode, t, rates)  # every chosen image was correct at every iteration
        assert rates == sorted(rates), (mode, t, rates)
        assert rates[-1] > 0.0, (mode, t, rates)
