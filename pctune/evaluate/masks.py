"""Moved to the measurement layer the search shares: the object masks to :mod:`pctune.measure.masks`, the
CAM regions and their IoU to :mod:`pctune.measure.gradcam`; kept importable here."""

from pctune.measure.gradcam import cam_regions, iou  # noqa: F401 (re-exported: moved to pctune.measure.gradcam)
from pctune.measure.masks import (  # noqa: F401 (re-exported: moved to pctune.measure.masks)
    BACKGROUND,
    IGNORE,
    decode_imagenet_s,
    imagenet_s_masks,
    ink_masks,
    object_mask,
    read_categories,
)
