"""The core: pure tensor functions and :class:`~tome.core.merger.TokenMerger`; no ``nn.Module``.

- :mod:`tome.core.merge`: bipartite soft matching, merging, unmerging, the merge history;
- :mod:`tome.core.merge2d`: tomesd's grid matching (one destination per cell) for diffusion;
- :mod:`tome.core.merger`: :class:`~tome.core.merger.TokenMerger`, the seed's primitive;
- :mod:`tome.core.schedule`: ``r`` schedules (int, per-layer list, ``(r, inflection)``) and ratios.
"""
