"""MLflow tracking: one parent run per search, one nested run per trial, summaries, the champion.

Names are public interface (see README, "MLflow tracking"). Only this package imports MLflow.
"""

from pctune.tracking.champion import load_champion, register_champion
from pctune.tracking.runs import SearchTracker, trial_metrics
from pctune.tracking.store import check_reachable, resolve_tracking_uri, ui_command
from pctune.tracking.summary import log_search_summary

__all__ = ["SearchTracker", "check_reachable", "load_champion", "log_search_summary", "register_champion",
           "resolve_tracking_uri",
           "trial_metrics", "ui_command"]
