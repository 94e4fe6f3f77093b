"""The chosen configuration in the MLflow Model Registry, with the alias ``champion``.

The registered model is an MLflow pyfunc whose artifacts rebuild the ``PredictiveNet``: the model
spec TOML, the feedback weights, the backbone weights (unless they are the library's pretrained
ones, recorded as such) and the hyperparameters with the number of timesteps. ``predict`` returns
the logits of the last timestep.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import tomllib
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet

ALIAS = "champion"


class PredictiveNetModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(images [B, C, H, W])`` -> logits of the last timestep."""

    # The images are plain arrays: no type-hint schema to infer. Without this, MLflow warns when the
    # class is defined, and that warning preceded every one-line error of the command.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.net, self.hparams, self.timesteps = _build(context.artifacts)

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.net.run(x, self.timesteps, self.hparams)[-1].numpy()


def _build(artifacts: dict[str, str]) -> tuple[PredictiveNet, Hyperparameters, int]:
    from pctune.models import create_model

    manifest = json.loads(Path(artifacts["manifest"]).read_text())
    net = create_model(artifacts["spec"], pretrained=manifest["pretrained"], backbone=manifest.get("backbone"),
                       backbone_weights=artifacts.get("backbone"), feedback_weights=artifacts["feedback"])
    hparams = Hyperparameters.from_mapping(tomllib.loads(Path(artifacts["hparams"]).read_text()), net.num_pcoders)
    return net, hparams, int(manifest["timesteps"])


def register_champion(uri: str, run_id: str, net: PredictiveNet, hparams: Hyperparameters, *, model_name: str,
                      spec_path: str | Path, timesteps: int, pretrained: bool,
                      backbone_weights: str | Path | None = None, backbone: str | None = None) -> str:
    """Log the network under ``run_id``, register it as ``model_name`` and point ``champion`` at it.
    Returns the registered version."""
    from pctune.models.weights import save_feedback_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(spec_path, tmp / "spec.toml")
        save_feedback_weights(net, tmp / "feedback.pt")
        (tmp / "hparams.toml").write_text(hparams.to_toml())
        (tmp / "manifest.json").write_text(json.dumps({"pretrained": pretrained, "timesteps": timesteps,
                                                           "backbone": backbone}))
        artifacts = {name: str(tmp / f) for name, f in [("spec", "spec.toml"), ("feedback", "feedback.pt"),
                                                        ("hparams", "hparams.toml"), ("manifest", "manifest.json")]}
        if backbone_weights is None and not pretrained:
            torch.save(net.backbone.state_dict(), tmp / "backbone.pt")
            backbone_weights = tmp / "backbone.pt"
        if backbone_weights is not None:
            artifacts["backbone"] = str(backbone_weights)
        mlflow.set_tracking_uri(uri)
        with _quiet(), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="champion", python_model=PredictiveNetModel(), artifacts=artifacts,
                                           registered_model_name=model_name, pip_requirements=["pctune"])
    client = MlflowClient(tracking_uri=uri)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(model_name, ALIAS, version)
    return version


@contextmanager
def _quiet():
    """Hide MLflow's progress bars and its generic warning about pickled python models (ours is a
    class of this package, loaded from its installed code)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def load_champion(model_name: str, uri: str, alias: str = ALIAS) -> tuple[PredictiveNet, Hyperparameters, int]:
    """The registered network, its hyperparameters and timesteps, back as pctune objects."""
    mlflow.set_tracking_uri(uri)
    with _quiet():
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")
    wrapped = model.unwrap_python_model()
    return wrapped.net, wrapped.hparams, wrapped.timesteps
