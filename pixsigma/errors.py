"""The one exception type the library raises for bad input.

The CLI catches it and prints its message on one line with a non-zero exit, so every message
must say what was wrong and what was expected.
"""


class PixsigmaError(ValueError):
    """Bad input: a file, a config value or an argument that cannot be used."""
