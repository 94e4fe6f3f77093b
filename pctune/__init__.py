"""pctune: distributed hyperparameter tuning for predictive-coding vision networks."""

from pctune.errors import PctuneError
from pctune.models import create_model, from_predify_config, list_models
from pctune.pc import Hyperparameters, PredictiveNet, RunResult

__version__ = "0.1.0"

__all__ = ["Hyperparameters", "PctuneError", "PredictiveNet", "RunResult", "__version__", "create_model",
           "from_predify_config", "list_models"]
