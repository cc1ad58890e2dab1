"""Errors a user can cause and fix: each carries one line naming the input and the fix."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the input, what is wrong and what to do."""


class ParityError(RuntimeError):
    """An exported or compressed model disagrees with its PyTorch original beyond tolerance."""


class ServingError(RuntimeError):
    """The Triton server could not be started, did not become ready, or answered wrongly."""


def one_line(error: BaseException | str, width: int = 300, with_type: bool = False) -> str:
    """An error's text on one line, cut at ``width``: an exception without text reads as its
    type's name, and ``with_type`` puts the type first (``ValueError: ...``)."""
    text = " ".join(str(error).split())
    if isinstance(error, BaseException):
        name = type(error).__name__
        if with_type:
            text = f"{name}: {text}" if text else name
        text = text or name
    return text if len(text) <= width else text[:width] + " ..."
