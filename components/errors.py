"""Errors a user can cause and fix: each carries one line naming the input and the fix."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the input, what is wrong and what to do."""


class ParityError(RuntimeError):
    """An exported or compressed model disagrees with its PyTorch original beyond tolerance."""


class ServingError(RuntimeError):
    """The Triton server could not be started, did not become ready, or answered wrongly."""


def one_line(exc: BaseException, width: int = 300) -> str:
    """An exception's text on one line (its type name when it has none), cut at ``width``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= width else text[:width] + " ..."
