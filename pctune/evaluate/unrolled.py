"""Moved to :mod:`pctune.measure.unrolled` (Grad-CAM explains the same network); kept importable here."""

from pctune.measure.unrolled import Unrolled  # noqa: F401 (re-exported: moved to pctune.measure.unrolled)
