"""``tome.tune``: the per-layer schedule that reaches a target speedup with the best fidelity
(:mod:`~tome.tools.tune.search`; its FLOP model: :mod:`~tome.tools.tune.budget`; scoring schedules: :mod:`~tome.tools.tune.scoring`; its text report: :mod:`~tome.tools.tune.report`)."""
