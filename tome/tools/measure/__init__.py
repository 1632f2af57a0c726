"""Measuring a patched model against the same model unmerged: speed (``tome bench``) and fidelity
(``tome eval``), for images and texts."""
