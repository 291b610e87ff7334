"""A small progress bar for long work (downloads, training, sampling), written to stderr."""
import sys
import time


def format_seconds(s):
    s = int(max(s, 0))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """`with Progress(total, "sampling") as bar: ... bar.update(n, loss="0.031")`.

    Redraws at most every `interval` seconds on a terminal; off a terminal (logs, CI) it prints a
    plain line every `log_every` seconds instead, so captured output stays short.
    """

    def __init__(self, total, desc="", unit="it", stream=None, interval=0.1, log_every=30.0,
                 disable=False, initial=0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else log_every
        self.disable = disable
        self.n = self.initial = initial
        self.start = self.last = time.perf_counter()
        self.fields = {}
        self.drawn = None  # the count shown by the last draw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1, **fields):
        self.n += n
        self.fields.update(fields)
        now = time.perf_counter()
        if not self.disable and (now - self.last >= self.interval or self.n >= (self.total or 0) > 0):
            self.last = now
            self._draw(now)

    def rate(self):
        elapsed = time.perf_counter() - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def _draw(self, now):
        self.drawn = self.n
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        extra = " ".join(f"{k} {v}" for k, v in self.fields.items())
        if self.total:
            frac = min(self.n / self.total, 1.0)
            width = 24
            fill = int(frac * width)
            bar = "#" * fill + "-" * (width - fill)
            left = (self.total - self.n) / rate if rate > 0 else 0.0
            line = (f"{self.desc} |{bar}| {self.n}/{self.total} {extra} "
                    f"[{format_seconds(elapsed)}<{format_seconds(left)}, {rate:.2f} {self.unit}/s]")
        else:
            line = f"{self.desc} {self.n} {extra} [{format_seconds(elapsed)}, {rate:.2f} {self.unit}/s]"
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.disable:
            return
        if self.drawn != self.n:
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
