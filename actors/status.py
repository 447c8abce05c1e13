"""What the driver shows while the warm-up, an evaluation or RL runs.

On a terminal, a tqdm bar. Anywhere else (a log file, a pipe, a cluster's job log) a bar
would write one endless line of carriage returns, so there the same figures go out as one
log line every `run.log_every_s` seconds (and one at the end), e.g.
`RL 12/60 (20%): reward 0.61 accuracy 0.55 version 12 tokens/s 5210`.
"""
import sys
import time

from tqdm import tqdm

from conf.schema import Config


class Status:
    def __init__(self, cfg: Config, log, desc: str, total: int, initial: int = 0):
        on_terminal = sys.stdout.isatty()
        self.log, self.desc, self.total, self.done = log, desc, total, initial
        self.bar = tqdm(desc=desc, total=total, initial=initial, file=sys.stdout,
                        disable=not (cfg.run.progress and on_terminal))
        self.lines = cfg.run.progress and not on_terminal
        self.every_s = cfg.run.log_every_s
        self.last_line, self.logged, self.figures = time.monotonic(), initial, {}

    def update(self, n: int = 1, **figures) -> None:
        """`n` more done; `figures` (name: value) go to the bar's postfix or the status line."""
        self.done += n
        self.figures = figures or self.figures
        self.bar.update(n)
        if figures:
            self.bar.set_postfix({name: _short(value) for name, value in figures.items()}, refresh=False)
        if self.lines and (time.monotonic() - self.last_line >= self.every_s or self.done >= self.total):
            self._line()

    def close(self) -> None:
        """The bar ends; in a log, the last figures get their line if the last interval had none."""
        self.bar.close()
        if self.lines and self.logged != self.done:
            self._line()

    def _line(self) -> None:
        self.last_line, self.logged = time.monotonic(), self.done
        shown = " ".join(f"{name.replace('_', ' ')} {_short(value)}" for name, value in self.figures.items())
        self.log.info("{} {}/{} ({:.0%}){}", self.desc, self.done, self.total, self.done / max(1, self.total),
                      f": {shown}" if shown else "")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
