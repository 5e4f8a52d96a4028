"""Errors meant for users: the CLI prints their message on one line, without a traceback."""


class SammixError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option)."""


class InputError(SammixError):
    """A file or folder that cannot be used. The message names the path and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
