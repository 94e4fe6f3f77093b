"""The measurement layer: what the search's objectives and the promotion stages both measure with.

Clean image sets (:mod:`~pctune.measure.images`), object masks (:mod:`~pctune.measure.masks`), Grad-CAM
IoU over timesteps (:mod:`~pctune.measure.gradcam`, on the network unrolled to a timestep,
:mod:`~pctune.measure.unrolled`) and ImageNet-C corruptions (:mod:`~pctune.measure.corruptions`). It sits
below both :mod:`pctune.search` and :mod:`pctune.evaluate` and imports neither (nor the pipeline, tracking,
the command line, Ray or MLflow), so the search measures what a stage measures without importing a stage.
"""
