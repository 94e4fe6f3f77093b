"""The predictive-coding engine (pure PyTorch)."""

from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet, RunResult
from pctune.pc.scaling import footprint, gradient_scale
from pctune.pc.split import split_backbone

__all__ = ["Hyperparameters", "PredictiveNet", "RunResult", "footprint", "gradient_scale", "split_backbone"]
