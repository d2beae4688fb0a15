"""Working with finished runs: find and compare them, sweep a grid, plot curves, predict images.

``runs`` finds run directories and reads them; ``compare`` groups runs by the recipe keys that
differ and computes statistics over seeds, ``paired`` pairs each group's runs with the
baseline's by seed (per-seed differences and their confidence interval) and ``student_t``
gives the Student-t quantiles for it; ``report`` renders a comparison (for ``sandbox compare``
and the end of ``sandbox ablate``) as a table, Markdown, CSV, LaTeX or JSON; ``sweep`` expands
an ablation grid, ``shards`` splits it between jobs, ``claims`` keeps two processes off one run
and ``sweep_status`` reads each run's state; ``curves`` and ``prediction_grid`` draw PNG
figures; ``colours`` and ``inference`` turn a checkpoint's predictions into coloured masks.
"""
