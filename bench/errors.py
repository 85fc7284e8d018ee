class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""


class TrainingFailed(BenchError):
    """Training diverged (its loss became NaN or infinite, or it left non-finite weights) or ended
    at chance (``bench.training.check_learned``): the run is stored as failed, with this message as
    its reason, and no checkpoint."""

    exit_status = 1  # not bad input (2): the request was valid, its training did not work


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line: the message's lines joined by ``; ``, cut at 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join(lines) or type(error).__name__
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}"
