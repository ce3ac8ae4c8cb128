"""Progress bars: tqdm, redrawn as usual on a terminal; where the output is a file or a pipe
(a log), redrawn at most once a minute, so that a long run's log holds a few lines, not
thousands of carriage-return updates."""
import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 60.0      # seconds between redraws when the output is not a terminal


def progress_bar(**kwargs):
    """tqdm(**kwargs), writing to kwargs' file (default stderr), rarely when that is no terminal."""
    out = kwargs.get("file") or sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(**kwargs)
