"""The evaluations a configuration goes through after the search: the promotion stages ``noise``,
``imagenet-c``, ``adversarial`` and ``explain`` (:mod:`~pctune.evaluate.stages`, one entry point per
stage), their typed settings (:mod:`~pctune.evaluate.settings`) and the checkpointed Ray shards they run
as (:mod:`~pctune.evaluate.shards`). What they measure with (clean image sets, masks, Grad-CAM IoU,
corruptions) is :mod:`pctune.measure`, which the search's objectives share; ``evaluate.images``,
``masks`` and ``unrolled`` re-export it for earlier callers. Nothing here imports the search or MLflow:
:func:`pctune.pipeline.promote` runs the stages and logs their results."""
