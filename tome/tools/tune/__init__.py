"""``tome.tune``: the per-layer schedule that reaches a target speedup with the best fidelity
(:mod:`~tome.tools.tune.search`; its text report: :mod:`~tome.tools.tune.report`)."""
