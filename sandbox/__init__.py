"""sandbox: a plugin-architecture research sandbox for semi-supervised semantic segmentation."""

__version__ = "0.1.0"
