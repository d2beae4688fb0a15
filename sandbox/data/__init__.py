"""Data: training and evaluation views, the stream sampler (``views``), the public file helpers for
dataset plugins (``segmentation_files``) and one-line data errors (``errors``). May import ``api``,
``errors``, ``recipe`` and ``processes``; nothing from ``train`` or above."""
