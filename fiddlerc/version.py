"""The package version: one home, read by the package, the plan, the manifest and module.py."""

__version__ = "0.3.0"
