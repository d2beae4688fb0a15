"""Run directories: their layout and guarded writes (``directory``), the claim that makes one process
their only writer (``claims``), atomic and durable file writes (``atomic_files``), the names of the
files a run keeps (``files``). Imports no torch at import time; may import ``errors`` and ``recipe``
lazily, nothing from ``processes``, ``train``, ``sweep``, ``analysis`` or ``cli``."""
