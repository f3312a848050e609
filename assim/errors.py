"""Errors that the command line turns into a clear message and a non-zero exit."""


class InputError(ValueError):
    """Bad user input (file, variable, argument). The message names what and where."""
