"""The model zoo: specs as data, Predify's format, weights, and one-line errors."""

import subprocess
import sys

import pytest
import torch

import pctune
from pctune import PctuneError
from pctune.models import load_feedback_weights, save_feedback_weights

PVGG16_PREDIFY = '''
imports = ["from torch.nn import Sequential, ReLU, ConvTranspose2d"]
name = "PVGG16"
input_size = [3, 224, 224]
gradient_scaling = false
shared_hyperparameters = false

[[pcoders]]
module = "features [3]"
predictor = "ConvTranspose2d(64, 3, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))"
hyperparameters = {feedforward=0.8, feedback=0.1, pc=0.01}
[[pcoders]]
module = "features [8]"
predictor = "Sequential(ConvTranspose2d(128, 64, kernel_size=(10, 10), stride=(2, 2), padding=(4, 4)), ReLU(inplace=True))"
hyperparameters = {feedforward=0.8, feedback=0.1, pc=0.01}
[[pcoders]]
module = "features[15]"
predictor = "Sequential(ConvTranspose2d(256, 128, kernel_size=(14, 14), stride=(2, 2), padding=(6, 6)), ReLU(inplace=True))"
hyperparameters = {feedforward=0.8, feedback=0.1, pc=0.01}
[[pcoders]]
module = "features[22]"
predictor = "Sequential(ConvTranspose2d(512, 256, kernel_size=(14, 14), stride=(2, 2), padding=(6, 6)), ReLU(inplace=True))"
hyperparameters = {feedforward=0.8, feedback=0.1, pc=0.01}
[[pcoders]]
module = "features[29]"
predictor = "Sequential(ConvTranspose2d(512, 512, kernel_size=(14, 14), stride=(2, 2), padding=(6, 6)), ReLU(inplace=True))"
hyperparameters = {feedforward=0.8, feedback=0.0, pc=0.01}
'''

PEFF_PREDIFY_MINIMAL = 'name = "PEff_b0"\ninput_size = [3,224,224]\ngradient_scaling = true\n' + "".join(
    f'[[pcoders]]\nmodule = "{m}"\n' for m in ["act1"] + [f"blocks[{i}]" for i in range(7)])


def test_registered_models_and_unknown_name():
    assert {"pvgg16", "peffnetb0", "presnet18"} <= set(pctune.list_models())
    with pytest.raises(PctuneError, match="unknown model 'vgg17'; known models: .*pvgg16"):
        pctune.create_model("vgg17")


def test_predify_config_builds_the_same_network_as_the_builtin_spec(tmp_path, pvgg16):
    path = tmp_path / "pvgg16_config.toml"
    path.write_text(PVGG16_PREDIFY)
    imported = pctune.from_predify_config(path, pvgg16.backbone)
    assert imported.encoder_modules == pvgg16.encoder_modules
    assert [type(d) for d in imported.decoders] == [type(d) for d in pvgg16.decoders]
    assert {k: v.shape for k, v in imported.decoders.state_dict().items()} == \
        {k: v.shape for k, v in pvgg16.decoders.state_dict().items()}
    # same presets, up to the top pcoder's lambda, which the dynamics ignore
    assert imported.hyperparameters().triples()[:4] == pvgg16.hyperparameters().triples()[:4]
    assert imported.hyperparameters().beta == pvgg16.hyperparameters().beta
    imported.decoders.load_state_dict(pvgg16.decoders.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(imported.run(x, 2), pvgg16.run(x, 2))


def test_predify_minimal_config_uses_default_decoders_like_the_builtin_peffnetb0(tmp_path, peffnetb0):
    path = tmp_path / "peff.toml"
    path.write_text(PEFF_PREDIFY_MINIMAL)
    imported = pctune.from_predify_config(path, peffnetb0.backbone)
    assert imported.encoder_modules == peffnetb0.encoder_modules  # act1 -> bn1 in current timm
    assert imported.gradient_scaling
    assert str(imported.decoders) == str(peffnetb0.decoders)


@pytest.mark.parametrize("predictor,message", [
    ("__import__('os').system('true')", "not an allowed layer"),
    ("ConvTranspose2d(64, 3, kernel_size=open('x'))", "only literal arguments"),
    ("Linear(64, 3)", "'Linear' is not an allowed layer"),
    ("ConvTranspose2d(64, 3, kernel_size=3, bogus=1)", "bad arguments for ConvTranspose2d"),
])
def test_predify_predictors_are_parsed_never_evaluated(tmp_path, predictor, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[[pcoders]]\nmodule = "features[3]"\npredictor = "{predictor}"\n')
    with pytest.raises(PctuneError, match=message):
        pctune.from_predify_config(path, torch.nn.Sequential())


def test_spec_file_path_is_accepted_and_validated(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        'name = "tiny"\nbackbone = "pctune/demo_cnn"\ninput_size = [1, 16, 16]\n'
        '[[pcoders]]\nmodule = "features.1"\n[[pcoders]]\nmodule = "features.4"\n'
        '[hyperparameters.default]\nbeta = 0.5\nlambda = 0.2\nalpha = 0.0\n')
    net = pctune.create_model(spec)
    assert net.num_pcoders == 2 and net.name == "tiny"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nbackbone = "pctune/demo_cnn"\n[[pcoders]]\nmodule = "features.99"\n')
    with pytest.raises(PctuneError, match="no module named 'features.99'"):
        pctune.create_model(bad)
    bad.write_text('name = "bad"\nbackbone = "pctune/demo_cnn"\n[[pcoders]]\nmodule = "features.1"\n'
                   'decoder = { type = "Linear", in_features = 3, out_features = 3 }\n')
    with pytest.raises(PctuneError, match=r"pcoder1.decoder: unknown decoder layer 'Linear'"):
        pctune.create_model(bad)


def test_published_predify_checkpoints_load(tmp_path, pvgg16, peffnetb0):
    # PVGG16: one state dict of the predictor module per pcoder
    for n, decoder in enumerate(pvgg16.decoders, start=1):
        torch.save(decoder.state_dict(), tmp_path / f"pvgg16_imagenet_pretrained_pc{n}_pmodule.pth")
    fresh = pctune.create_model("pvgg16", feedback_weights=tmp_path)
    for a, b in zip(fresh.decoders.state_dict().values(), pvgg16.decoders.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # PEfficientNetB0: dicts whose 'pcoderweights' entry has pmodule.-prefixed keys
    files = []
    for n, decoder in enumerate(peffnetb0.decoders, start=1):
        weights = {f"pmodule.{k}": v for k, v in decoder.state_dict().items()}
        files.append(tmp_path / f"peff_pc{n}.pth")
        torch.save({"pcoderweights": weights, "epoch": 5}, files[-1])
    fresh = pctune.create_model("peffnetb0", feedback_weights=files)
    for a, b in zip(fresh.decoders.state_dict().values(), peffnetb0.decoders.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pctune_checkpoint_round_trip_and_mismatch(tmp_path, pvgg16):
    path = tmp_path / "feedback.pt"
    save_feedback_weights(pvgg16, path)
    net = pctune.create_model("presnet18")
    with pytest.raises(PctuneError, match="does not match presnet18's decoders"):
        load_feedback_weights(net, path)


def test_offline_pretrained_download_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download must be attempted
    with pytest.raises(PctuneError, match="could not fetch torchvision's pretrained weights for resnet18"):
        pctune.create_model("presnet18", pretrained=True)


def test_cli_prints_one_line_errors():
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "train-feedback", "nosuch", "--data", "."],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pctune: error: unknown model 'nosuch'; known models: demo, peffnetb0, presnet18, pvgg16"]
