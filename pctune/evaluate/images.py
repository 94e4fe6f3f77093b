"""Moved to :mod:`pctune.measure.images` (the measurement layer the search shares); kept importable here."""

from pctune.measure.images import Images, clean_images  # noqa: F401 (re-exported: moved to pctune.measure.images)
