"""User-facing errors: the CLI prints them without a traceback and exits with code 2."""


class AlignError(Exception):
    """A mistake in the user's recipe, data, model or reward function.

    The message names what is wrong (file, key, dataset row, function) and how to fix it.
    """
