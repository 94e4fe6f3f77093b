"""The ``explain`` stage: Grad-CAM through the unrolled network, masks, IoU and the paired bootstrap."""

import numpy as np
import pandas as pd
import pytest
import torch
from captum.attr import LayerGradCam
from PIL import Image

import pctune
from pctune import PctuneError
from pctune.data.demo import digits, digits_normalization
from pctune.evaluate.explain import ExplainPayload, iou_table, layer_cams
from pctune.evaluate.images import clean_images
from pctune.evaluate.masks import cam_regions, decode_imagenet_s, imagenet_s_masks, ink_masks, iou
from pctune.evaluate.settings import ExplainSettings, parse_stage_settings
from pctune.evaluate.stages import run_stage
from pctune.models.registry import get_spec
from pctune.models.spec import spec_from_mapping

HP = {"beta": [0.6, 0.7, 0.8], "lambda": [0.3, 0.2, 0.0], "alpha": [0.01, 0.02, 0.05]}


@pytest.fixture(scope="module")
def demo():
    """The demo architecture with seeded random weights (no training needed to compare CAMs)."""
    torch.manual_seed(0)
    net = pctune.create_model("demo")
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    pixels, labels = digits("test", normalize=False)
    mean, std = digits_normalization()
    return net, net.hyperparameters(HP), pixels[:12], labels[:12], [mean], [std]


def _payload(demo, timesteps=3):
    net, hp, pixels, labels, mean, std = demo
    return ExplainPayload(net, hp, pixels, labels, *ink_masks(pixels), mean, std, timesteps)


def test_cam_at_t0_equals_gradcam_of_the_plain_backbone(demo):
    net, _, pixels, labels, mean, std = demo
    layer = dict(net.backbone.named_modules())[net.cam_layer]
    plain = LayerGradCam(net.backbone, layer).attribute((pixels - mean[0]) / std[0], target=labels,
                                                        relu_attributions=True)
    ours = layer_cams(_payload(demo), pixels, labels, 0)
    assert plain.abs().max() > 0
    torch.testing.assert_close(ours, plain.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer_cams(_payload(demo), pixels, labels, 3), ours)  # the dynamics move the map


def test_cam_at_t_explains_the_last_pcoder_representation_at_t(demo):
    net, hp, pixels, labels, mean, std = demo
    t = 2
    x = (pixels - mean[0]) / std[0]
    result = net.run(x, t, hp, grad_mode="exact", return_representations=True)
    rep = result.representations[t][-1]  # the last pcoder's e(t): the classifier's input at t
    (grad,) = torch.autograd.grad(result.logits[t].gather(1, labels[:, None]).sum(), rep)
    expected = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * rep).sum(1, keepdim=True))
    torch.testing.assert_close(layer_cams(_payload(demo), pixels, labels, t), expected.detach(), rtol=1e-4,
                               atol=1e-6)


def test_iou_of_a_known_map_and_mask_by_hand():
    cams = torch.tensor([[[[0.0, 1.0], [0.2, 0.9]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    maps, regions = cam_regions(cams, (2, 2), 0.5)  # normalised: [[0, 1], [0.2, 0.9]] -> region = right column
    assert regions[0].tolist() == [[False, True], [False, True]] and not regions[1].any()  # a flat CAM: no region
    objects = torch.tensor([[[False, True], [True, False]]]).repeat(2, 1, 1)
    valid = torch.ones_like(objects)
    assert iou(regions, objects, valid).tolist() == pytest.approx([1 / 3, 0.0])
    valid[:, 1, 0] = False  # the mask's lower-left pixel is "ignore": inter 1, union 2
    assert iou(regions, objects, valid)[0].item() == pytest.approx(1 / 2)
    assert maps[0].flatten().tolist() == pytest.approx([0.0, 1.0, 0.2, 0.9])


def test_imagenet_s_masks_decode_and_match_by_file_name(tmp_path):
    ids = np.zeros((16, 16), dtype=np.int64)
    ids[:8] = 2  # the image's class (ImageNet-S id 2 = the second line of the categories file)
    ids[8:10] = 1000  # ignore
    ids[12:, :4] = 300  # another class: R = 44, G = 1
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    (tmp_path / "masks" / "n02").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "masks" / "n02" / "ILSVRC2012_val_00000007.png")
    assert (decode_imagenet_s(tmp_path / "masks" / "n02" / "ILSVRC2012_val_00000007.png") == ids).all()
    (tmp_path / "cats.txt").write_text("n01\nn02\n")
    names = ["n01/ILSVRC2012_val_00000001.JPEG", "n02/ILSVRC2012_val_00000007.JPEG"]
    # image size 14: resized to 16 (256/224), centre-cropped to 14 (one pixel off every side)
    objects, valid, found = imagenet_s_masks(tmp_path / "masks", names, 14, tmp_path / "cats.txt")
    assert found == [1] and objects.shape == (1, 14, 14)
    assert objects[0, :7].all() and not objects[0, 7:].any()
    assert not valid[0, 7:9].any() and valid[0, :7].all() and valid[0, 9:].all()
    everything, _, _ = imagenet_s_masks(tmp_path / "masks", names, 14)  # no categories: every labelled pixel
    assert everything[0, 11:, :3].all() and int(everything[0].sum()) == 7 * 14 + 3 * 3
    with pytest.raises(PctuneError, match="no mask matches any of the 1 images"):
        imagenet_s_masks(tmp_path / "masks", names[:1], 14)


def _results(matrix: np.ndarray, sigma: float) -> list[dict]:
    return [{"sigma": sigma, "start": 0, "stop": matrix.shape[1],
             "iou": {str(t): row.tolist() for t, row in enumerate(matrix)}, "seconds": 1.0}]


def test_the_bootstrap_is_paired_across_timesteps_and_noise_levels():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.8, size=200)  # images differ a lot; every image gains exactly 0.1 by t = 2
    matrix = np.stack([base, base + 0.05, base + 0.1])
    table = iou_table(_results(matrix, 0.0) + _results(matrix, 0.5), resamples=500)
    clean, noisy = table[table.sigma == 0.0], table[table.sigma == 0.5]
    last = clean[clean.timestep == 2].iloc[0]
    assert last.ci_high - last.ci_low > 0.05  # the marginal interval is wide ...
    assert last.delta_ci_low == pytest.approx(0.1) and last.delta_ci_high == pytest.approx(0.1)  # ... the paired one not
    assert (clean.relative_t0.iloc[0], last.delta_t0) == (pytest.approx(1.0), pytest.approx(0.1))
    cols = ["iou", "ci_low", "ci_high", "rel_ci_low", "rel_ci_high"]
    pd.testing.assert_frame_equal(clean[cols].reset_index(drop=True), noisy[cols].reset_index(drop=True))


def test_the_stage_writes_iou_per_timestep_and_the_overlays(demo, tmp_path):
    net, hp, *_ = demo
    settings = parse_stage_settings("explain", {"timesteps": 2, "sigmas": [0.0, 0.5], "num_images": 6, "chunk": 4,
                                                "use_ray": False, "resamples": 50, "overlays": 2}, "--set")
    images = clean_images("digits", None, net.input_size, 6, 0)
    result = run_stage(settings, net, hp, images, tmp_path, log=lambda _m: None)
    table = pd.read_csv(tmp_path / "iou.csv")
    assert sorted(zip(table.sigma, table.timestep, strict=True)) == [(s, t) for s in (0.0, 0.5) for t in range(3)]
    assert table.iou.between(0, 1).all() and (table.images == 6).all()
    assert {(m, step) for m, _, step in result.metrics} >= {("cam_iou_sigma0.5", 2), ("cam_iou_sigma0", 0)}
    assert {p.name for p in result.artifacts} >= {"iou.csv", "iou_over_timesteps.png", "overlays_sigma0.png",
                                                  "overlays_sigma0.5.png", "cost.json"}
    assert len(list((tmp_path / "shards").glob("*.json"))) == 4  # 2 sigmas x 2 chunks, resumable


@pytest.mark.parametrize("table,message", [
    ({"cam_threshold": 1.5}, r"^--set: explain.cam_threshold: must be in \[0, 1\], got 1.5$"),
    ({"grad_mode": "transfer"}, r"^--set: explain.grad_mode: unknown mode 'transfer'"),
    ({"sigmas": []}, r"^--set: explain.sigmas: must list at least one noise level$"),
])
def test_bad_explain_settings_are_one_line(table, message):
    with pytest.raises(PctuneError, match=message):
        parse_stage_settings("explain", table, "--set", name="explain")
    assert ExplainSettings().cam_threshold == 0.5


def test_the_spec_names_the_cam_layer():
    assert get_spec("pvgg16").cam_layer == "features.29" and get_spec("demo").cam_layer == "features.7"
    spec = {"name": "x", "backbone": "pctune/demo_cnn", "pcoders": [{"module": "features.1"}]}
    assert spec_from_mapping(spec).cam_layer is None  # the default: the last pcoder's
    with pytest.raises(PctuneError, match=r"^m.toml: cam_layer 'features.9' must be one of the pcoder modules"):
        spec_from_mapping({**spec, "cam_layer": "features.9"}, "m.toml")
