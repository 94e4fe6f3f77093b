"""The model zoo: networks declared as TOML specs (``specs/``), built by ``create_model``."""

from pctune.models.registry import build_from_spec, create_model, from_predify_config, get_spec, list_models
from pctune.models.weights import load_feedback_weights, save_feedback_weights

__all__ = ["build_from_spec", "create_model", "from_predify_config", "get_spec", "list_models",
           "load_feedback_weights", "save_feedback_weights"]
