"""The package version, where the runtime can read it without importing the package root."""
__version__ = "0.1.0"
