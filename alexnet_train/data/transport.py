"""HTTP downloads for ``alexnet-data``: resumed from a ``.part`` file, retried, with progress.

Usage::

    from alexnet_train.data.transport import ByteProgress, download

    download("http://cs231n.stanford.edu/tiny-imagenet-200.zip", Path("dl/tiny-imagenet-200.zip"),
             log=print, expected_size=248_100_043)      # a re-run resumes dl/tiny-imagenet-200.zip.part

    progress = ByteProgress(n_files, "unpack train", unit="files")   # tqdm on a TTY, else log lines
    progress.update(1)
    progress.close()
"""
from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable

from ..errors import PublicDataError

USER_AGENT = "alexnet-train (alexnet-data)"
CHUNK = 1 << 20


class ByteProgress:
    """A tqdm bar on a TTY, else a plain line every ``every_s`` seconds and at the end."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, stream: IO[str] | None = None,
                 every_s: float = 10.0, unit: str = "B") -> None:
        self.total, self.desc, self.count, self.unit = total, desc, initial, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.initial = initial
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, unit=unit,
                            unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000, leave=False)

    def _amount(self, n: int) -> str:
        return f"{n / 2**20:,.1f} MiB" if self.unit == "B" else f"{n:,}"

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        done = self._amount(self.count)
        if self.total:
            done += f" / {self._amount(self.total)} ({100.0 * self.count / self.total:.0f}%)"
        speed = f"{rate / 2**20:.1f} MiB/s" if self.unit == "B" else f"{rate:,.0f}/s"
        eta = ""
        if self.total and rate > 0 and self.count < self.total:
            eta = f", ETA {_duration((self.total - self.count) / rate)}"
        return f"{self.desc}: {done}, {speed}{eta}"

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _connect(url: str, have: int, expected_size: int | None, timeout: float) -> http.client.HTTPResponse | None:
    """Returns the response to a GET of ``url`` from byte ``have`` on, or None when the server answers
    that ``have`` bytes are already the whole file.  An HTTP error is a PublicDataError; a failed
    connection (URLError, OSError) is raised as it is, for the caller to retry.
    """
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and (expected_size is None or have == expected_size):
            return None  # the .part is already the whole file
        raise PublicDataError(f"{url}: HTTP {exc.code} {exc.reason}") from None


def _receive(response: http.client.HTTPResponse, part: Path, dest: Path, have: int, expected_size: int | None,
             log: Callable[[str], None], stream: IO[str] | None) -> tuple[int | None, bool, Exception | None]:
    """Write the response's body to ``part``: appended after a 206, from the start after a 200.

    Returns (the whole file's size if known, whether any bytes came, the error that cut the
    connection or None).  A failed write is a PublicDataError.
    """
    if have and response.status == 206:
        mode = "ab"
        total = have + int(response.headers.get("Content-Length", 0) or 0)
        log(f"resuming {dest.name} at {have / 2**20:,.1f} MiB")
    else:
        mode, have = "wb", 0  # a 200 to a Range request: the server sends the whole file again
        length = response.headers.get("Content-Length")
        total = int(length) if length else None
    if total is None:
        total = expected_size
    progress = ByteProgress(total, f"download {dest.name}", initial=have, stream=stream)
    got_any = False
    try:
        with open(part, mode) as fh:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                fh.write(chunk)
                progress.update(len(chunk))
                got_any = True
    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset connection, IncompleteRead
        if isinstance(exc, OSError) and exc.filename:
            raise PublicDataError(f"{part}: {exc.strerror or exc}") from None
        progress.close()
        return total, got_any, exc
    progress.close()
    return total, got_any, None


def download(url: str, dest: Path, log: Callable[[str], None], expected_size: int | None = None,
             retries: int = 5, timeout: float = 60.0, stream: IO[str] | None = None) -> Path:
    """Fetch ``url`` to ``dest``, resuming from ``dest.part`` (HTTP Range) after a cut or a re-run.

    A connection that breaks mid-file is retried from where it stopped, up to
    ``retries`` times in a row without progress.  ``dest`` appears only when the
    whole file is there (its length as the server gave it).
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            response = _connect(url, have, expected_size, timeout)
        except (urllib.error.URLError, OSError) as exc:
            failures += 1
            reason = getattr(exc, "reason", exc)
            if failures > retries:
                raise PublicDataError(f"{url}: cannot connect ({reason}); on a machine without internet "
                                      f"download {dest.name} elsewhere and pass --from FILE") from None
            log(f"{url}: {reason}; retrying in {min(30, 2 ** failures)} s ({failures}/{retries})")
            time.sleep(min(30, 2 ** failures))
            continue
        if response is None:
            break
        with response:
            total, got_any, lost = _receive(response, part, dest, have, expected_size, log, stream)
            if lost is not None:
                failures = 0 if got_any else failures + 1
                if failures > retries:
                    raise PublicDataError(f"{url}: connection keeps failing ({lost})") from None
                log(f"{url}: connection lost ({type(lost).__name__}: {lost}); resuming")
                continue
        size = part.stat().st_size
        if total is not None and size < total:
            failures += 1
            if failures > retries:
                raise PublicDataError(f"{url}: the server sent {size} of {total} bytes")
            log(f"{url}: connection closed at {size:,} of {total:,} bytes; resuming")
            continue
        break
    os.replace(part, dest)
    return dest
