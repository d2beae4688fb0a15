"""Ablation sweeps: expand a grid into runs, split them between jobs, and train them without two
processes ever training one run (the machinery behind ``sandbox ablate``, the only command that
imports this package).

- ``grid``: parse ``--grid`` and ``--seeds``, expand the combinations (dropping options the chosen
  plugin does not take), name each run's folder (``<folder>/<label>/seed<k>/``).
- ``shards``: ``--shard K/N``, the deterministic share of the runs one of N jobs trains.
- ``training``: train one run as ``sandbox run`` does, record its failure, note a stale finished run.
- ``execute``: the loop over a job's share of runs, and the tally of what happened to them.
- ``status``: each run's state read from its folder alone (``sandbox ablate --list``).

Who trains a run is :mod:`sandbox.rundir`'s (its claim and the decision taken on it, the same for
``sandbox run``); how every process of a job learns the decision, :mod:`sandbox.processes`'. May import
every package but ``cli``. No module here imports torch or accelerate at import time: ``training``
and ``execute`` import them inside functions. Expanding a grid and ``--list`` need neither (the
plugin registry, which imports torch, is loaded only to check a grid option against its plugin).
"""
