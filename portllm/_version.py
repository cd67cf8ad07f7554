"""portllm's version, in a module of its own so that code below the package root can read it
without importing ``portllm`` (which loads everything)."""

__version__ = "0.1.0"
