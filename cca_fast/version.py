"""The package version (its own module: importing it loads nothing else of cca_fast)."""

__version__ = "0.1.0"
