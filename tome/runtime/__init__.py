"""What every patched model shares, one job a module:

- :mod:`~tome.runtime.patching`: ``tome.patch`` / ``tome.unpatch``, routed through
  :mod:`~tome.runtime.registry` (the adapters' registry; :mod:`~tome.runtime.support` prints
  the support table from it);
- :mod:`~tome.runtime.options`: family options declared once (``Option``);
  :mod:`~tome.runtime.merge_options`: ``MergeOptions``, the token models' merging options;
- :mod:`~tome.runtime.base`: ``PatchHandle``, what every ``model.tome`` shares (options,
  install / undo, pickling); :mod:`~tome.runtime.handle`: ``ToMeHandle``, the token models'
  handle and the block protocol; :mod:`~tome.runtime.models`: ``PatchedModels`` (a wrapper's
  ``model.tome``);
- :mod:`~tome.runtime.passes`: per-pass state; :mod:`~tome.runtime.install`: what patching
  installs, as picklable data; :mod:`~tome.runtime.legacy`: the clear error for models pickled
  by tome 0.1.
"""
