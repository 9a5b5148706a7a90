"""The one base class of every error caused by user input: the CLI prints its message as one line, exit code 2."""


class UserError(ValueError):
    """Bad input: a path, a config value, a data set, a checkpoint. The message names the value and what is accepted."""
