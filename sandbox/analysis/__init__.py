"""Working with finished runs: find and compare them, plot curves, predict images, probe features.

``runs`` finds run directories and reads them; ``compare`` groups runs by the recipe keys that
differ and computes statistics over seeds, ``paired`` pairs each group's runs with the
baseline's by seed (per-seed differences and their confidence interval) and ``student_t``
gives the Student-t quantiles for it; ``report`` renders a comparison (for ``sandbox compare``
and the end of ``sandbox ablate``) as a table, Markdown, CSV, LaTeX or JSON; ``curves`` and
``prediction_grid`` draw PNG figures; ``colours`` and ``inference`` turn a checkpoint's
predictions into coloured masks; ``probe`` (with ``probe_models``, ``probe_pass`` and
``probe_figure``) measures features of trained runs. Running a sweep (grids, shards, claims,
each run's state) is :mod:`sandbox.sweep`'s. May import ``train`` and every package below it; nothing
from ``sweep`` or ``cli``.
"""
