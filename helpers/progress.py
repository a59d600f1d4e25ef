"""The one progress bar: a training epoch's steps, or a download's bytes.

In a terminal it redraws one line, at most ten times a second; anywhere else
(a log file, CI) it prints nothing until close(), which prints one line, so
logs stay short (like Keras's verbose=2).
"""

import sys
import time


class ProgressBar:
    """bar = ProgressBar(total); bar.update(done, "loss: 0.3"); bar.close("...").

    total: the number of steps (or bytes) in all; describe(done, total)
    gives the counter shown before the bar (by default "12/430").
    """

    def __init__(self, total, stream=None, describe=None):
        self.total, self.stream = max(int(total), 1), stream or sys.stdout
        self.describe = describe or (lambda done, total: f"{done:>{len(str(total))}}/{total}")
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def update(self, done, extra=""):
        now = time.perf_counter()
        if not self.tty or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        eta = self.elapsed() / max(done, 1) * (self.total - done)
        bar = "━" * int(20 * min(done / self.total, 1.0))
        print(f"\r{self.describe(done, self.total)} {bar:<20} {self.elapsed():.0f}s "
              f"(ETA {eta:.0f}s){' - ' + extra if extra else ''}",
              end="", file=self.stream, flush=True)

    def close(self, line):
        """Replace the bar with its last line (in a terminal), or print it."""
        print("\r" + line + "\033[K" if self.tty else line, file=self.stream, flush=True)
