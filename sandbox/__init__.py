"""sandbox: a plugin-architecture research sandbox for semi-supervised semantic segmentation.

Its packages import downwards only (``tests/test_layers.py`` holds the order): ``errors`` and
``host_side``; ``api``, ``hookspecs``, ``registry``; ``rundir``; ``processes``; ``recipe``, ``plugins``;
``data``; ``density``; ``train``; ``analysis``, ``bench``; ``sweep``; ``cli``.
"""

__version__ = "0.1.0"
