"""Errors a user can cause and fix: each carries one line naming the input and the fix."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the input, what is wrong and what to do."""


class ParityError(RuntimeError):
    """An exported or compressed model disagrees with its PyTorch original beyond tolerance."""


class ServingError(RuntimeError):
    """The Triton server could not be started, did not become ready, or answered wrongly."""
