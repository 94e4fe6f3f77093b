"""The evaluations a configuration goes through after the search: the promotion stages ``noise``,
``imagenet-c``, ``adversarial`` and ``explain`` (:mod:`~pctune.evaluate.stages`, one entry point per
stage), their typed settings (:mod:`~pctune.evaluate.settings`), the clean images they start from
(:mod:`~pctune.evaluate.images`) and the checkpointed Ray shards they run as
(:mod:`~pctune.evaluate.shards`). The ``explain`` stage's Grad-CAM (:mod:`~pctune.evaluate.explain`)
also scores the ``cam_iou`` search objective. Nothing here imports the search or MLflow:
:func:`pctune.pipeline.promote` runs the stages and logs their results."""
