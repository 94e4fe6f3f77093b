"""ImageNet-C on a generated tree: metrics against a hand computation, Ray workers, failures."""

import json
import math
import os

import numpy as np
import pytest
import torch
from imagecorruptions import corrupt
from PIL import Image

import pctune
from pctune import PctuneError
from pctune.evaluate import imagenet_c as ic

T = 2
SIZE = 32
CLASSES = ["n001", "n002", "n003", "n004"]
SPEC = '''name = "tiny-rgb-c"
backbone = "pctune/demo_cnn"
backbone_kwargs = { in_channels = 3, num_classes = 4, width = 8 }
input_size = [3, 32, 32]
[[pcoders]]
module = "features.1"
[[pcoders]]
module = "features.4"
[hyperparameters.default]
beta = 0.5
lambda = 0.3
alpha = 0.0
'''
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A clean val folder (4 classes x 3 images, 32x32) and its ImageNet-C tree in the released layout,
    corrupted with imagecorruptions and saved as JPEG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    val = root / "val"
    for k, wnid in enumerate(CLASSES):
        (val / wnid).mkdir(parents=True)
        for i in range(3):
            base = rng.normal(size=(8, 8, 3))
            base[..., k % 3] += 2.0 * (k + 1) / 4
            img = np.uint8(255 * (base - base.min()) / (np.ptp(base) + 1e-9))
            Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR).save(val / wnid / f"img{i}.JPEG")
    released = root / "imagenet-c"
    np.random.seed(0)
    for c in ic.standard_corruptions() + ic.extra_corruptions():
        for s in range(1, 6):
            for wnid in CLASSES:
                out = released / c / str(s) / wnid
                out.mkdir(parents=True)
                for path in sorted((val / wnid).iterdir()):
                    img = corrupt(np.asarray(Image.open(path).convert("RGB")), corruption_name=c, severity=s)
                    Image.fromarray(np.uint8(np.clip(img, 0, 255))).save(out / path.name, quality=85)
    return val, released


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "tiny.toml"
    spec.write_text(SPEC)
    torch.manual_seed(0)
    model = pctune.create_model(spec)
    with torch.no_grad():  # a sharper random classifier, so errors differ between corruptions
        model.backbone.classifier.weight.mul_(20)
    return model


def _payload(net, plan):
    return ic.CorruptionPayload(net, net.hyperparameters("default"), T, plan, SIZE, MEAN, STD, batch_size=5, workers=0)


def _hand_correctness(net, path, label, resize):
    img = Image.open(path).convert("RGB")
    if resize:
        img = img.resize((36, 36), Image.BILINEAR) if min(img.size) != 36 else img
        left = (img.size[0] - SIZE) // 2
        img = img.crop((left, left, left + SIZE, left + SIZE))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return (net.run(x[None], T, "default")[:, 0].argmax(-1) == label).int().tolist()


@pytest.mark.slow
def test_metrics_match_a_hand_computation_on_two_ray_workers(trees, net, tmp_path):
    import ray

    val, released = trees
    corruptions = ic.standard_corruptions() + ic.extra_corruptions()
    plan = ic.plan_released(released, corruptions, range(1, 6), clean=val, num_classes=4)
    assert plan.skipped == [] and len(plan.shards) == 19 * 5 + 1
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = ic.run(_payload(net, plan), tmp_path, use_ray=True, log=lambda _m: None)
    finally:
        ray.shutdown()
    tables = ic.summarize(results, resamples=300)

    # by hand: per-image correctness, errors, CE, mCE and relative mCE
    alex = ic.alexnet()
    err = {}
    for c in corruptions:
        for s in range(1, 6):
            rows = [_hand_correctness(net, p, CLASSES.index(p.parent.name), False)
                    for p in sorted((released / c / str(s)).rglob("*.JPEG"))]
            err[c, s] = [1 - sum(r[t] for r in rows) / len(rows) for t in range(T + 1)]
    clean_rows = [_hand_correctness(net, p, CLASSES.index(p.parent.name), True) for p in sorted(val.rglob("*.JPEG"))]
    clean = [1 - sum(r[t] for r in clean_rows) / len(clean_rows) for t in range(T + 1)]
    errors = tables["errors"].set_index(["corruption", "severity", "timestep"])["error"]
    for (c, s), values in err.items():
        for t in range(T + 1):
            assert errors[c, s, t] == pytest.approx(values[t])
    mce = tables["mce"].set_index("timestep")
    ces = tables["ce"].set_index(["corruption", "timestep"])
    for t in range(T + 1):
        ce = {c: sum(err[c, s][t] for s in range(1, 6)) / sum(alex["errors"][c]) for c in corruptions}
        rel = {c: sum(err[c, s][t] - clean[t] for s in range(1, 6)) / sum(a - alex["clean"] for a in alex["errors"][c])
               for c in corruptions}
        for c in corruptions:
            assert ces.loc[(c, t), "ce"] == pytest.approx(ce[c])
            assert ces.loc[(c, t), "relative_ce"] == pytest.approx(rel[c])
            base = sum(err[c, s][0] for s in range(1, 6)) / sum(alex["errors"][c])
            if base > 0:
                assert ces.loc[(c, t), "ce_over_t0"] == pytest.approx(ce[c] / base)
        assert mce.loc[t, "mce"] == pytest.approx(np.mean([ce[c] for c in alex["standard"]]))
        assert mce.loc[t, "relative_mce"] == pytest.approx(np.mean([rel[c] for c in alex["standard"]]))
        assert mce.loc[t, "mce_extra"] == pytest.approx(np.mean([ce[c] for c in alex["extra"]]))
        assert mce.loc[t, "mce_ci_low"] <= mce.loc[t, "mce"] <= mce.loc[t, "mce_ci_high"]
    assert len({r["pid"] for r in results}) >= 2, "shards ran on more than one worker"


@pytest.mark.slow
def test_killed_worker_still_yields_complete_correct_results(trees, net, tmp_path):
    import ray

    val, released = trees
    corruptions = ["gaussian_noise", "fog", "contrast"]
    plan = ic.plan_released(released, corruptions, range(1, 6), clean=val, num_classes=4)
    expected = ic.run(_payload(net, plan), tmp_path / "reference", use_ray=False, log=lambda _m: None)
    marker = tmp_path / "killed"
    os.environ["PCTUNE_FAULT_SHARD"] = f"fog_s3:{marker}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = ic.run(_payload(net, plan), tmp_path / "faulty", use_ray=True, log=lambda _m: None)
    finally:
        ray.shutdown()
        del os.environ["PCTUNE_FAULT_SHARD"]
    assert marker.exists()
    assert [r["correct"] for r in got] == [r["correct"] for r in expected]
    assert json.loads((tmp_path / "faulty" / "shards" / "fog_s3.json").read_text())["pid"] != int(marker.read_text())


def test_malformed_trees_are_errors_or_listed_skips(trees, net, tmp_path):
    val, released = trees
    with pytest.raises(PctuneError, match="none of the corruption folders"):
        ic.plan_released(val, ["fog"], [1], clean=None, num_classes=4)
    with pytest.raises(PctuneError, match="the class list has 4 classes but the model predicts 10"):
        ic.plan_released(released, ["fog"], [1], clean=None, num_classes=10)
    # a missing corruption and severity are listed, and mCE is not reported from an incomplete set
    plan = ic.plan_released(released, ["fog", "not_a_corruption"], [1, 2, 6], clean=None, num_classes=4)
    assert any(s.startswith("not_a_corruption/1: missing") for s in plan.skipped)
    assert any(s.startswith("fog/6: missing") for s in plan.skipped)
    # an unreadable image is listed as skipped, not counted
    broken = tmp_path / "broken"
    for wnid in CLASSES:
        (broken / "fog" / "1" / wnid).mkdir(parents=True)
        for p in (released / "fog" / "1" / wnid).iterdir():
            (broken / "fog" / "1" / wnid / p.name).write_bytes(p.read_bytes())
    (broken / "fog" / "1" / "n002" / "img1.JPEG").write_bytes(b"not a jpeg")
    plan = ic.plan_released(broken, ["fog"], [1], clean=None, num_classes=4)
    results = ic.run(_payload(net, plan), tmp_path / "out", use_ray=False, log=lambda _m: None)
    assert results[0]["images"] == 11 and results[0]["skipped"] == [str(broken / "fog" / "1" / "n002" / "img1.JPEG")]
    tables = ic.summarize(results, resamples=50)
    assert tables["ce"].ce.isna().all()  # fog has only severity 1: no CE
    assert tables["mce"].mce.isna().all()


def test_generated_source_is_seeded(trees, net, tmp_path):
    val, _ = trees
    plan = ic.plan_generated(val, ["gaussian_noise", "glass_blur"], [2], num_classes=4, seed=1)
    a = ic.run(_payload(net, plan), tmp_path / "a", use_ray=False, log=lambda _m: None)
    b = ic.run(_payload(net, plan), tmp_path / "b", use_ray=False, log=lambda _m: None)
    assert [r["correct"] for r in a] == [r["correct"] for r in b]
    assert {r["source"] for r in a} == {"generated"}
    assert not math.isnan(ic.error_table(a).error.mean())
