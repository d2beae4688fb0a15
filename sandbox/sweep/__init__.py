"""Ablation sweeps: expand a grid into runs, split them between jobs, and train them without two
processes ever training one run (the machinery behind ``sandbox ablate``).

- ``grid``: parse ``--grid`` and ``--seeds``, expand the combinations (dropping options the chosen
  plugin does not take), name each run's folder (``<folder>/<label>/seed<k>/``).
- ``shards``: ``--shard K/N``, the deterministic share of the runs one of N jobs trains.
- ``claims``: a claim file in each run directory keeps two processes (jobs, shards) off one run;
  refreshed while held, taken over once stale, released on exit and on SIGTERM.
- ``decisions``: what every process of a job does with one run (``plan`` it from its folder,
  claim it on the main process, broadcast the decision).
- ``training``: train one run as ``sandbox run`` does, record its failure, note a stale finished run.
- ``execute``: the loop over a job's share of runs, and the tally of what happened to them.
- ``status``: each run's state read from its folder alone (``sandbox ablate --list``).

No module here imports torch or accelerate at import time: ``training``, ``execute`` and
``decisions.agree_on`` (the broadcast) import them inside functions. Expanding a grid, ``--list``
and the claims need neither (the plugin registry, which imports torch, is loaded only to check a
grid option against its plugin).
"""
