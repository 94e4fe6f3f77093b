"""Adversarial evaluation on the demo network (CPU): gradients, attacks, shards, Ray fault tolerance."""

import json
import os

import foolbox as fb
import pytest
import torch

import pctune
from pctune.data.demo import digits, digits_normalization, ensure_demo_model
from pctune.evaluate.adversarial import (
    AttackPayload,
    AttackSpec,
    Shard,
    run_all,
    run_shard,
    select_images,
    success_table,
)
from pctune.evaluate.unrolled import Unrolled

# The module's fixture trains the demo network (about 20 s of CPU) and the attacks take minutes.
pytestmark = pytest.mark.slow

T = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = ensure_demo_model(tmp_path_factory.mktemp("cache"), log=lambda _m: None)
    net = pctune.create_model("demo", backbone_weights=paths["backbone"], feedback_weights=paths["feedback"])
    pixels, labels = digits("test", normalize=False)
    mean, std = digits_normalization()
    return net, pixels, labels, [mean], [std]


def _setup(demo, attacks, count=8, hparams="default"):
    net, pixels, labels, mean, std = demo
    hp = net.hyperparameters(hparams)
    idx, targets = select_images(net, hp, pixels, labels, mean, std, T, count, seed=0)
    return AttackPayload(net, hp, pixels[idx], labels[idx], targets, pixels, mean, std, T, attacks)


def test_selected_images_are_correct_at_every_timestep(demo):
    net, pixels, labels, mean, std = demo
    hp = net.hyperparameters("default")
    idx, targets = select_images(net, hp, pixels, labels, mean, std, T, 20, seed=3)
    x = (pixels[idx] - mean[0]) / std[0]
    logits = net.run(x, T, hp)
    assert (logits.argmax(-1) == labels[idx]).all()
    assert (targets != labels[idx]).all()
    again, same_targets = select_images(net, hp, pixels, labels, mean, std, T, 20, seed=3)
    assert torch.equal(again, idx) and torch.equal(same_targets, targets)


def test_unrolled_gradient_matches_finite_differences(demo):
    net, pixels, _, mean, std = demo
    net64 = pctune.create_model("demo").double()
    net64.load_state_dict(net.state_dict())
    model = Unrolled(net64, pctune.Hyperparameters(0.6, 0.2, 0.5), T, mean, std, "exact").double()
    x = pixels[:1].double().clone()

    def loss(inp):
        return model(inp)[0, 3]

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xg), xg)
    assert grad.abs().sum() > 0
    for idx in [(0, 0, 4, 4), (0, 0, 8, 9), (0, 0, 12, 3)]:
        delta = torch.zeros_like(x)
        delta[idx] = 1e-6
        numeric = (loss(x + delta) - loss(x - delta)) / 2e-6
        assert abs(numeric.item() - grad[idx].item()) <= 1e-6 + 1e-5 * abs(numeric.item())


def test_timestep_zero_equals_attacking_the_plain_backbone(demo):
    setup = _setup(demo, [AttackSpec("bim", [0.05, 0.1, 0.2], steps=10)])
    result = run_shard(setup, Shard("bim", "exact", 0, 0, 8), seed=0)
    net, _, _, mean, std = demo
    plain = torch.nn.Sequential(Normalize(mean[0], std[0]), net.backbone).eval()
    torch.manual_seed(0 + 0 * 7919 + 0)  # the shard's seed
    attack = fb.attacks.LinfBasicIterativeAttack(steps=10, rel_stepsize=0.25, random_start=True)
    _, _, is_adv = attack(fb.PyTorchModel(plain, bounds=(0, 1)), setup.pixels[:8],
                          fb.criteria.TargetedMisclassification(setup.targets[:8]), epsilons=[0.05, 0.1, 0.2])
    assert result["success"]["0"] == is_adv.long().tolist()


class Normalize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


def test_all_three_attacks_end_to_end_and_success_grows_with_epsilon(demo, tmp_path):
    attacks = [AttackSpec("bim", [0.02, 0.1, 0.3], steps=10), AttackSpec("pgd", [0.2, 1.0, 3.0], steps=10),
               AttackSpec("hsj", [0.5, 2.0, 6.0], steps=4, max_images=4)]
    setup = _setup(demo, attacks)
    results = run_all(setup, tmp_path, chunk=8, use_ray=False, log=lambda _m: None)
    table = success_table(results, T, resamples=200)
    assert set(table.attack) == {"bim", "pgd", "hsj"}
    assert set(table["mode"]) == {"exact", "constant-error", "transfer", "decision"}
    assert set(table.timestep) == set(range(T + 1))
    for (attack, mode, t), group in table.groupby(["attack", "mode", "timestep"]):
        rates = group.sort_values("epsilon").success_rate.tolist()
        assert rates[-1] > rates[0], (attack, mode, t, rates)
        assert all(0 <= r <= 1 for r in rates)
    # transfer attacks are crafted once at t = 0: at t = 0 they equal the exact white-box attack
    t0 = table[table.timestep == 0].set_index(["attack", "mode", "epsilon"]).success_rate
    for attack in ("bim", "pgd"):
        assert t0[attack, "transfer"].tolist() == t0[attack, "exact"].tolist()
    assert (table.ci_low <= table.success_rate + 1e-12).all() and (table.success_rate <= table.ci_high + 1e-12).all()


def test_killed_worker_loses_only_its_shard(demo, tmp_path):
    import ray

    attacks = [AttackSpec("pgd", [0.5, 2.0], steps=5, modes=["exact"])]
    setup = _setup(demo, attacks)
    victim = "pgd_exact_t1_00004-00008"
    marker = tmp_path / "killed"
    os.environ["PCTUNE_FAULT_SHARD"] = f"{victim}:{marker}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_all(setup, tmp_path / "out", chunk=4, use_ray=True, log=lambda _m: None)
    finally:
        ray.shutdown()
        del os.environ["PCTUNE_FAULT_SHARD"]
    assert marker.exists(), "the fault was injected"
    names = [r["shard"] for r in results]
    assert len(names) == len(set(names)) == (T + 1) * 2
    victim_result = json.loads((tmp_path / "out" / "shards" / f"{victim}.json").read_text())
    assert victim_result["pid"] != int(marker.read_text()), "a new worker redid the lost shard"
    # an interrupted run redoes only the missing shards
    shard_files = sorted((tmp_path / "out" / "shards").glob("*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in shard_files}
    shard_files[0].unlink()
    messages = []
    run_all(setup, tmp_path / "out", chunk=4, use_ray=False, log=messages.append)
    assert messages[0] == f"adversarial: {len(before)} shards, {len(before) - 1} already done, 1 to run"
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").glob("*.json")}
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [shard_files[0].name]
