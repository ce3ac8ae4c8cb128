"""Progress bars redraw as usual on a terminal and rarely where output goes to a log (minihbt.bars)."""
import io

from minihbt import bars


class Terminal(io.StringIO):
    def isatty(self):
        return True


def redraws(out, monkeypatch, interval):
    monkeypatch.setattr(bars, "LOG_INTERVAL", interval)
    clock = iter(range(0, 10**6, 5))                 # each update 5 "seconds" after the last
    monkeypatch.setattr("tqdm.std.time", lambda: next(clock))
    with bars.progress_bar(total=200, file=out, desc="x") as bar:
        for _ in range(200):
            bar.update(1)
    return out.getvalue().count("\r")


def test_a_log_gets_a_redraw_a_minute_a_terminal_every_update(monkeypatch):
    in_log = redraws(io.StringIO(), monkeypatch, 60.0)      # 200 updates over 1,000 s: at most one per 60 s
    on_terminal = redraws(Terminal(), monkeypatch, 60.0)
    assert on_terminal >= 150 and 2 <= in_log <= 1000 // 60 + 2, (on_terminal, in_log)
