"""What every patched model shares: :func:`~tome.runtime.patching.patch` / ``unpatch`` and their
routing through the adapter registry (:mod:`tome.runtime.registry`), the options
(:mod:`tome.runtime.options`), the handle ``model.tome`` (:mod:`tome.runtime.handle`), per-pass
state (:mod:`tome.runtime.passes`), and what is installed on a model and how it is undone
(:mod:`tome.runtime.install`).
"""
