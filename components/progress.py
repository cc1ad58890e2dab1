"""Progress lines from inside a stage, tagged so the command line can show them amid KFP's logs."""

PREFIX = "torchship | "


def report(message: str) -> None:
    """Print one progress line, flushed at once so it shows while the stage runs."""
    print(f"{PREFIX}{message}", flush=True)
