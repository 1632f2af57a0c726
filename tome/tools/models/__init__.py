"""Models for the tools: the wrappers the measuring, tuning, pictures and embed tools run
(:mod:`~tome.tools.models.vision`, :mod:`~tome.tools.models.text`), and loading them from a
``--model`` spec (:mod:`~tome.tools.models.loading`, :mod:`~tome.tools.models.text_loading`)."""
