"""Training: the trainer (``loop``), the step (``step``, ``student_pass``, ``cutmix``), the iteration
around it (``iteration``, ``accumulation``, ``step_state``, ``ema``) and their settings (``accelerator``,
``builder``, ``levers``, ``determinism``, ``optimizer``). May import every package below it (``rundir``,
``processes``, ``recipe``, ``plugins``, ``data``, ``density``); nothing from ``analysis``, ``bench``,
``sweep`` or ``cli``."""
