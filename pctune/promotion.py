"""Promotion: the top-k configurations of a finished search through the evaluation stages.

Kept for compatibility: the orchestration lives in :mod:`pctune.pipeline` (``promote``, ``candidates``)
and the stages in :mod:`pctune.evaluate.stages`.
"""

from pctune.evaluate.images import Images, clean_images
from pctune.evaluate.stages import evaluate_one as evaluate
from pctune.evaluate.stages import run_stage
from pctune.pipeline import Candidate, candidates, promote

__all__ = ["Candidate", "Images", "candidates", "clean_images", "evaluate", "promote", "run_stage"]
