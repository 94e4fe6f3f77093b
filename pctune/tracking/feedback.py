"""A feedback training in MLflow: one run per training, its weights registered by name.

- experiment ``<model>-feedback`` unless the user names one; run name ``train-feedback-<model>``;
- params: what the caller passes (model, backbone weights, data path and digest, epochs, lr, global
  batch, workers, precision, ...);
- metrics per step: ``train_step_loss`` (step = global step); per epoch (step = epoch):
  ``train_recon_loss_pc{n}``, ``val_recon_loss_pc{n}`` (with a held-out
  split), ``train_recon_loss``, ``val_recon_loss``, ``images_per_s``; the loss curves as a plot;
- the final weights as the artifact ``feedback/feedback.pt``, registered as a new version of the model
  ``<model>-feedback``. ``models:/<model>-feedback@latest`` then names them: ``latest`` is MLflow's own
  alias for a model's newest version (reserved, so no one can point it elsewhere), and every training
  moves it.

A resumed training reopens its run (the caller keeps the run id beside its checkpoint), so the history
has one run with every epoch once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pctune.errors import PctuneError
from pctune.utils import first_line, pyplot, save_figure

ARTIFACT_DIR = "feedback"
ALIAS = "latest"  # MLflow's own: the newest version


def registered_name(model: str) -> str:
    """The registered model (and default experiment) of ``model``'s feedback weights."""
    return f"{model}-feedback"


class FeedbackRun:
    """The MLflow run of one feedback training (every method may be called again after a resume)."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            if run_id is not None:
                self.client.get_run(run_id)
        except Exception as exc:  # MLflow raises its own and requests' exception types
            raise PctuneError(f"cannot use MLflow experiment {experiment!r} at {uri}: {first_line(exc)}") from exc
        self.run_id = run_id
        self.logged_step = self.logged_epoch = 0  # what the run holds already: a resume logs only what follows

    def start(self, model: str, params: Mapping[str, Any]) -> str:
        """A new run with ``params``, or (a resume) the run given, reopened."""
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=f"train-feedback-{model}",
                                         tags={"pctune.model": model})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_step = self._last_step("train_step_loss")
            self.logged_epoch = self._last_step("train_recon_loss")
        return self.run_id

    def _last_step(self, metric: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One epoch of the history (:func:`pctune.training.train_feedback`), at step = epoch (an epoch the
        run holds already, from before a resume, is not logged again)."""
        if int(record["epoch"]) <= self.logged_epoch:
            return
        self.logged_epoch = int(record["epoch"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, 0, int(record["epoch"]))
                                                    for k, v in epoch_metrics(record).items()])

    def log_steps(self, losses: Sequence[tuple[int, float]]) -> None:
        """``train_step_loss`` at step = the global step (every step once: a report carries the steps since
        the last, and a worker group restarted from a checkpoint reports only the steps after it; a step the
        run holds already, logged before the driver died and recomputed after a resume, is not logged again)."""
        metrics = [Metric("train_step_loss", float(loss), 0, int(step)) for step, loss in losses
                   if int(step) > self.logged_step]
        self.logged_step = max([self.logged_step, *(m.step for m in metrics)])
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 entries
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])

    def finish(self, weights: str | Path, history: Sequence[Mapping[str, Any]], model: str) -> str:
        """Log the weights and the loss curves, register the weights as a new version of
        ``<model>-feedback`` (``@latest`` then names it) and end the run; returns the version."""
        self.client.log_artifact(self.run_id, str(weights), ARTIFACT_DIR)
        _log_curves(self.client, self.run_id, history)
        name = registered_name(model)
        try:
            self.client.get_registered_model(name)
        except Exception:  # not registered yet (MLflow's own "not found")
            self.client.create_registered_model(name, description=f"feedback decoders of {model} (pctune)")
        version = self.client.create_model_version(name, f"runs:/{self.run_id}/{ARTIFACT_DIR}", run_id=self.run_id,
                                                   tags={"pctune.epochs": str(len(history))})
        self.client.set_terminated(self.run_id, "FINISHED")
        return str(version.version)

    def stop(self, status: str = "KILLED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one epoch's record."""
    metrics = {"train_recon_loss": float(record["loss"]), "images_per_s": float(record.get("images_per_s", 0.0))}
    metrics.update({f"train_recon_loss_pc{n}": float(v) for n, v in enumerate(record["pcoder_losses"], start=1)})
    if record.get("val_pcoder_losses"):
        metrics["val_recon_loss"] = float(record["val_loss"])
        metrics.update({f"val_recon_loss_pc{n}": float(v) for n, v in enumerate(record["val_pcoder_losses"], start=1)})
    return metrics


def _log_curves(client: MlflowClient, run_id: str, history: Sequence[Mapping[str, Any]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for n in range(len(history[0]["pcoder_losses"]) if history else 0):
        line, = ax.plot(epochs, [h["pcoder_losses"][n] for h in history], marker="o", label=f"train pc{n + 1}")
        if history[0].get("val_pcoder_losses"):
            ax.plot(epochs, [h["val_pcoder_losses"][n] for h in history], ls="--", color=line.get_color(),
                    label=f"val pc{n + 1}")
    ax.set(xlabel="epoch", ylabel="reconstruction loss (MSE)", yscale="log", title="feedback training")
    ax.legend(fontsize=7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recon_loss.png"
        save_figure(fig, path)
        client.log_artifact(run_id, str(path), "plots")
