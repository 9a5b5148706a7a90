"""The one base class of every error caused by user input: the CLI prints its message as one line, exit code 2."""


class UserError(ValueError):
    """Bad input: a path, a config value, a data set, a checkpoint. The message names the value and what is accepted."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
