"""The download engine: idempotent, verified, resumable, retried, bounded and offline-aware.

Why not pooch or astropy's download cache
-----------------------------------------
Both were weighed. ``pooch.retrieve`` gives atomic writes, hash checks and retries, and
``astropy.utils.data.download_file`` gives a cache; but neither resumes a partial file with an
HTTP ``Range`` request, neither tells a permanent answer (404: report it, do not retry) from a
transient one (503, timeout, dropped connection: back off and retry), neither can show one
progress bar over ~10,000 files and their bytes, and astropy's cache keeps files under its own
hashed names rather than the archive layout ``data/raw/archive/`` must have. So this module keeps
a small engine on top of :mod:`requests` (the HTTP library both of them use), about 200 lines:

* a file is written to ``<out>/.partial/<path>.part`` and renamed into place with
  :func:`os.replace` only after it has been verified, so a final path only ever holds a complete,
  verified file; the ``.part`` files are the resume state of an interrupted run;
* verification: the size (``Content-Length`` / ``Content-Range``), an expected sha256 when the
  caller knows it, the server's digest header when it sends one (``Repr-Digest`` / ``Digest``
  with sha-256, or ``Content-MD5``), and a per-product check (e.g. the gzip CRC of a LAMOST
  ``.fits.gz``);
* retries with exponential backoff on timeouts, dropped connections, 429 and 5xx answers; a
  resumed attempt asks only for the missing bytes;
* bounds: each file has an overall deadline (``deadline`` seconds, all attempts together,
  extended for big files at ``min_rate`` bytes/s), so a server that drips a byte at a time is
  abandoned and the file reported as failed (its ``.part`` is kept for the next run); a task may
  cap its size (``FileTask.max_bytes``; LAMOST spectra: 64 MiB), so an endless or inflating
  answer cannot fill the disk;
* a thread pool of a few workers (default 6) for politeness;
* :class:`Manifest` records each file's path, source URL, size, sha256 and date; a file that is in
  place and matches its record is never fetched again.

Nothing here prints: progress goes through :mod:`tqdm.auto` (when asked) and messages through
:mod:`logging`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MOCK_HINT = ("To run the pipeline without the archives, use the embedded mock universe: set "
             "LAMOSTCANNON_SOURCE=mock (the default) and re-run the notebook.")

#: Statuses that will not change on a retry.
_PERMANENT = {400, 401, 403, 404, 410, 451}
#: Statuses worth retrying after a pause.
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


class ArchiveUnavailable(RuntimeError):
    """An archive cannot be reached (offline, DNS, refused, or down); the text says what to do.

    Raised with a short message and no chained traceback, so that a notebook shows one line.
    """

    def __init__(self, what: str, url: str, reason: str):
        self.what, self.url, self.reason = what, url, reason
        super().__init__(f"{what} is not reachable ({reason}; tried {url}). Check the network "
                         f"connection or try later. {MOCK_HINT}")

    def _render_traceback_(self):  # IPython: show the message, not a wall of frames
        return [f"ArchiveUnavailable: {self}"]


class _Transient(Exception):
    """A failure worth retrying (timeout, dropped connection, 5xx, bad checksum)."""


class _Permanent(Exception):
    """A failure a retry cannot fix (404 and friends), or no time left to retry."""


class _Deadline(Exception):
    """The file's overall deadline passed during a transfer: ``(bytes so far, total)``."""


@dataclass(frozen=True)
class FileTask:
    """One file to fetch.

    Parameters
    ----------
    url : str
        Where the file is.
    path : str
        Destination, relative to the output folder (POSIX separators).
    key : str
        Short name for reports (an obsid, a sobject_id and camera, a catalogue name).
    sha256 : str, optional
        Expected checksum, when the archive publishes one.
    size : int, optional
        Expected size in bytes, when the archive publishes it.
    max_bytes : int, optional
        Refuse the file when it grows beyond this (bytes as written, after any HTTP
        ``Content-Encoding`` is undone).
    """

    url: str
    path: str
    key: str = ""
    sha256: str | None = None
    size: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class Failure:
    """A file that could not be fetched, and why."""

    key: str
    url: str
    reason: str


@dataclass
class FetchReport:
    """What one batch did: files fetched now, files already in place, failures (with reasons)."""

    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    bytes: int = 0

    def merge(self, other: "FetchReport") -> "FetchReport":
        self.fetched += other.fetched
        self.skipped += other.skipped
        self.failures += other.failures
        self.bytes += other.bytes
        return self


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Manifest:
    """``manifest.json``: one record per file (path, url, size, sha256, date), plus notes.

    Layout::

        {"source": "archive", "files": [{"path": ..., "url": ..., "size": ..., "sha256": ...,
         "date": ...}, ...], "notes": {...}}

    Thread-safe; written atomically (temporary name, then :func:`os.replace`).
    """

    def __init__(self, root: Path, source: str = "archive"):
        self.root = Path(root)
        self.path = self.root / "manifest.json"
        self.source = source
        self._lock = threading.Lock()
        self._files: dict[str, dict] = {}
        self.notes: dict = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self._files = {rec["path"]: rec for rec in data.get("files", [])}
            self.notes = data.get("notes", {})

    def get(self, path: str) -> dict | None:
        with self._lock:
            return self._files.get(path)

    def record(self, path: str, url: str, *, sha256: str | None = None, size: int | None = None,
               **extra) -> dict:
        """Record a file that is in place under :attr:`root` (hashing it unless given)."""
        full = self.root / path
        rec = {"path": path, "url": url, "size": full.stat().st_size if size is None else size,
               "sha256": sha256 or sha256_of(full), "date": _now(), **extra}
        with self._lock:
            self._files[path] = rec
        return rec

    def is_verified(self, path: str) -> bool:
        """True when the file is in place and matches its record (size and sha256)."""
        rec, full = self.get(path), self.root / path
        if rec is None or not full.is_file() or full.stat().st_size != rec["size"]:
            return False
        return sha256_of(full) == rec["sha256"]

    def save(self) -> None:
        with self._lock:
            data = {"source": self.source,
                    "files": [self._files[k] for k in sorted(self._files)],
                    "notes": self.notes}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def _digest_from_headers(headers) -> tuple[str, str] | None:
    """(algorithm, hex digest) from ``Repr-Digest``/``Digest``/``Content-MD5``, if present."""
    for name in ("Repr-Digest", "Digest"):
        value = headers.get(name)
        if not value:
            continue
        for part in value.split(","):
            algo, _, val = part.strip().partition("=")
            if algo.strip().lower() in ("sha-256", "sha256"):
                return "sha256", base64.b64decode(val.strip().strip(":")).hex()
    if headers.get("Content-MD5"):
        return "md5", base64.b64decode(headers["Content-MD5"]).hex()
    return None


class Downloader:
    """Fetch many files politely and safely; see the module docstring.

    Parameters
    ----------
    timeout : (float, float)
        Connect and read timeouts in seconds (the read timeout bounds a stalled server).
    retries : int
        Extra attempts per file after the first, for transient failures.
    backoff : float
        First pause in seconds; doubles with every retry (capped at 60 s).
    workers : int
        Parallel downloads (a thread pool; 4-8 is polite for the survey archives).
    progress : bool
        Show :mod:`tqdm.auto` bars for files and bytes.
    validate : callable, optional
        ``validate(part_path, task)`` raises ``ValueError`` when a downloaded file is bad and may
        rewrite it (e.g. gzip a plain FITS file); runs before the rename into place.
    breaker : int
        Abort with :class:`ArchiveUnavailable` after this many files in a row failed to connect.
    deadline : float
        Seconds one file may take, all attempts and pauses together, before it is abandoned
        and reported as failed (default 600). A server that sends a byte now and then never
        trips the read timeout; this bounds it.
    min_rate : float
        Bytes per second a big file is allowed: its deadline is at least its size (from the
        answer's headers) divided by this (default 20 kB/s).
    """

    def __init__(self, *, timeout=(10.0, 60.0), retries: int = 4, backoff: float = 1.0,
                 workers: int = 6, progress: bool = True, user_agent: str | None = None,
                 breaker: int = 25, deadline: float = 600.0, min_rate: float = 20_000.0):
        from .. import __version__

        if deadline <= 0 or min_rate <= 0:
            raise ValueError(f"deadline and min_rate must be > 0, got {deadline}, {min_rate}")
        self.deadline = float(deadline)
        self.min_rate = float(min_rate)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.workers = max(1, int(workers))
        self.progress = progress
        self.user_agent = user_agent or f"lamostcannon/{__version__} (+python-requests)"
        self.breaker = breaker
        self._local = threading.local()

    # -- plumbing ---------------------------------------------------------------------------
    def session(self):
        """A :class:`requests.Session` per thread."""
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["User-Agent"] = self.user_agent
        return s

    def check_reachable(self, url: str, what: str) -> None:
        """Raise :class:`ArchiveUnavailable` unless the host of ``url`` answers at all.

        Any HTTP answer below 500 counts as reachable (a 404 for ``/`` is fine); refused
        connections, DNS failures, timeouts and persistent 5xx answers do not.
        """
        import requests

        parts = urlsplit(url)
        root = f"{parts.scheme}://{parts.netloc}/"
        reason = "no answer"
        for attempt in range(2):
            try:
                r = self.session().head(root, timeout=self.timeout, allow_redirects=True)
                if r.status_code < 500:
                    return
                reason = f"HTTP {r.status_code}"
            except requests.exceptions.ConnectionError as exc:
                reason = _short(exc)
            except requests.exceptions.Timeout:
                reason = "timed out"
            if attempt == 0:
                time.sleep(min(self.backoff, 5.0))
        raise ArchiveUnavailable(what, root, reason) from None

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = min(self.backoff * 2 ** attempt, 60.0)
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        return delay

    def _pause(self, attempt: int, retry_after: str | None = None) -> None:
        time.sleep(self._delay(attempt, retry_after))

    # -- one file ---------------------------------------------------------------------------
    def _attempt(self, task: FileTask, part: Path, on_bytes: Callable[[int], None],
                 clock: dict) -> None:
        """One GET (resuming ``part``); returns when ``part`` holds the whole file.

        ``clock["end"]`` is the file's deadline (``time.monotonic()``); it is pushed back for a
        big file (size / ``min_rate``) once the answer says how big.
        """
        import requests
        import urllib3

        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with self.session().get(task.url, headers=headers, stream=True,
                                    timeout=self.timeout) as r:
                if r.status_code in _PERMANENT:
                    raise _Permanent(f"HTTP {r.status_code}")
                if r.status_code == 416:  # our partial file is not a prefix of theirs
                    part.unlink(missing_ok=True)
                    raise _Transient("HTTP 416 on resume; restarting")
                if r.status_code in _TRANSIENT or r.status_code >= 500:
                    raise _Transient(f"HTTP {r.status_code}", r.headers.get("Retry-After"))
                if r.status_code not in (200, 206):
                    raise _Permanent(f"HTTP {r.status_code}")
                if r.status_code == 200 and offset:  # server ignored the Range: start over
                    offset = 0
                total = _expected_total(r, offset)
                if total is not None:
                    clock["end"] = max(clock["end"], clock["start"] + total / self.min_rate)
                    if task.max_bytes is not None and total > task.max_bytes:
                        raise _Permanent(f"the server announces {total} bytes, more than the "
                                         f"{task.max_bytes}-byte limit for this file")
                digest = _digest_from_headers(r.headers)
                part.parent.mkdir(parents=True, exist_ok=True)
                size = offset
                with open(part, "ab" if offset else "wb") as fh:
                    for chunk in _chunks(r):
                        fh.write(chunk)
                        size += len(chunk)
                        on_bytes(len(chunk))
                        if task.max_bytes is not None and size > task.max_bytes:
                            fh.close()
                            part.unlink(missing_ok=True)
                            raise _Permanent(f"more than the {task.max_bytes}-byte limit for "
                                             "this file")
                        if time.monotonic() > clock["end"]:
                            raise _Deadline(size, total)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError,
                ConnectionError, TimeoutError) as exc:
            raise _Transient(_short(exc)) from None
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Transient(f"connection dropped after {size} of {total} bytes")
        if total is not None and size > total:
            part.unlink()
            raise _Transient(f"got {size} bytes, expected {total}")
        expected_size = task.size
        if expected_size is not None and size != expected_size:
            part.unlink()
            raise _Transient(f"size mismatch: {size} != published {expected_size}")
        checks = []
        if task.sha256:
            checks.append(("sha256", task.sha256.lower()))
        if digest:
            checks.append(digest)
        for algo, want in checks:
            got = _hash_file(part, algo)
            if got != want:
                part.unlink()
                raise _Transient(f"checksum mismatch ({algo})")

    def fetch(self, task: FileTask, root: Path, manifest: Manifest,
              validate: Callable | None = None,
              on_bytes: Callable[[int], None] = lambda n: None) -> dict:
        """Fetch one file into ``root / task.path``; returns its manifest record.

        Gives up (``_Permanent``) when the file's deadline passes, whatever the attempt.
        """
        dest = root / task.path
        part = root / ".partial" / (task.path + ".part")
        last = "no attempt"
        start = time.monotonic()
        clock = {"start": start, "end": start + self.deadline}
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                self._attempt(task, part, on_bytes, clock)
                if validate is not None:
                    try:
                        validate(part, task)
                    except ValueError as exc:
                        part.unlink(missing_ok=True)
                        raise _Transient(f"invalid file: {exc}") from None
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, dest)
                return manifest.record(task.path, task.url)
            except _Deadline as exc:
                raise _Permanent(
                    f"abandoned: the {clock['end'] - start:.1f} s deadline for one file passed "
                    f"after {time.monotonic() - start:.1f} s with {exc.args[0]}"
                    f"{'' if exc.args[1] is None else f' of {exc.args[1]}'} bytes received "
                    "(the partial file is kept; a later run resumes it)") from None
            except _Transient as exc:
                last = str(exc.args[0])
                retry_after = exc.args[1] if len(exc.args) > 1 else None
                log.debug("%s: attempt %d failed: %s", task.key or task.url, attempt + 1, last)
            if attempt < self.retries:
                if time.monotonic() + self._delay(attempt, retry_after) > clock["end"]:
                    raise _Permanent(f"{last}; abandoned: no time left before the "
                                     f"{clock['end'] - start:.1f} s deadline for one file "
                                     f"(after {attempt + 1} attempts)")
                self._pause(attempt, retry_after)
        raise _Transient(f"{last} (after {self.retries + 1} attempts)")

    # -- many files -------------------------------------------------------------------------
    def fetch_many(self, tasks: Iterable[FileTask], root: Path, manifest: Manifest, *,
                   what: str, validate: Callable | None = None) -> FetchReport:
        """Fetch every task not already verified in ``manifest``; never raises for one file.

        Raises
        ------
        ArchiveUnavailable
            When the archive cannot be reached before the batch starts, or when
            ``breaker`` files in a row fail to connect during it.
        """
        tasks = list(tasks)
        report = FetchReport()
        todo = []
        for t in tasks:
            unsafe = _unsafe_path(t.path)
            if unsafe:  # e.g. a catalogue whose plan id holds '../': never write outside root
                report.failures.append(Failure(t.key or t.path, t.url, unsafe))
                continue
            dest = root / t.path
            if manifest.is_verified(t.path):
                report.skipped.append(t.key or t.path)
            elif dest.is_file() and manifest.get(t.path) is None:
                # Renamed into place only after verification, but the manifest was not saved
                # (interrupted run): adopt it.
                manifest.record(t.path, t.url)
                report.skipped.append(t.key or t.path)
            else:
                todo.append(t)
        if not todo:
            manifest.save()
            report.failures.sort(key=lambda f: f.key)
            return report
        self.check_reachable(todo[0].url, what)

        bars = _bars(len(tasks), len(tasks) - len(todo), what) if self.progress else None
        lock = threading.Lock()
        state = {"bytes": 0, "in_a_row": 0, "last_save": time.monotonic()}
        stop = threading.Event()

        def on_bytes(n):
            with lock:
                state["bytes"] += n
            if bars:
                bars[1].update(n)

        def work(task):
            if stop.is_set():
                return task, None, "cancelled"
            try:
                return task, self.fetch(task, root, manifest, validate, on_bytes), None
            except (_Permanent, _Transient) as exc:
                return task, None, str(exc)

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lamostcannon-dl")
        try:
            futures = [pool.submit(work, t) for t in todo]
            for fut in as_completed(futures):
                task, rec, error = fut.result()
                if error is None:
                    report.fetched.append(task.key or task.path)
                    state["in_a_row"] = 0
                elif error != "cancelled":
                    report.failures.append(Failure(task.key or task.path, task.url, error))
                    connect = any(w in error for w in ("refused", "resolve", "unreachable",
                                                       "Max retries", "timed out"))
                    state["in_a_row"] = state["in_a_row"] + 1 if connect else 0
                    if state["in_a_row"] >= self.breaker:
                        stop.set()
                if bars:
                    bars[0].update(1)
                if time.monotonic() - state["last_save"] > 5.0:
                    manifest.save()
                    state["last_save"] = time.monotonic()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            manifest.save()
            if bars:
                for b in bars:
                    b.close()
        report.bytes = state["bytes"]
        if stop.is_set():
            last = report.failures[-1]
            raise ArchiveUnavailable(what, last.url, f"{self.breaker} files in a row failed: "
                                     f"{last.reason}") from None
        report.failures.sort(key=lambda f: f.key)
        return report


def _unsafe_path(path: str) -> str | None:
    """Why ``path`` may not be a destination below the output folder, or None."""
    from pathlib import PurePosixPath, PureWindowsPath

    parts = PurePosixPath(path).parts
    if (not path or PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()
            or ".." in parts or ".." in PureWindowsPath(path).parts):
        return (f"unsafe destination path {path!r} (absolute or with '..'): it would be "
                "written outside the output folder; not fetched")
    return None


def _chunks(r, size: int = 1 << 16):
    """The body of a streamed answer, each piece as soon as the socket has it.

    ``requests``' ``iter_content`` waits for a full chunk, so a server dripping a byte at a
    time would keep it for hours between two deadline checks; urllib3's ``read1`` returns after
    one read of the socket.
    """
    raw = r.raw
    if not hasattr(raw, "read1"):  # pragma: no cover - urllib3 < 2.1
        yield from r.iter_content(chunk_size=1 << 13)
        return
    while chunk := raw.read1(size, decode_content=True):  # b"" only at the end
        yield chunk


def _expected_total(r, offset: int) -> int | None:
    """Full size of the file from Content-Range (206) or Content-Length (200)."""
    if r.status_code == 206:
        cr = r.headers.get("Content-Range", "")
        if "/" in cr and cr.rsplit("/", 1)[1].strip().isdigit():
            return int(cr.rsplit("/", 1)[1])
        cl = r.headers.get("Content-Length")
        return offset + int(cl) if cl and cl.isdigit() else None
    if r.headers.get("Content-Encoding", "identity") not in ("identity", ""):
        return None  # Content-Length counts compressed bytes
    cl = r.headers.get("Content-Length")
    return int(cl) if cl and cl.isdigit() else None


def _hash_file(path: Path, algo: str) -> str:
    if algo == "sha256":
        return sha256_of(path)
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _short(exc: Exception) -> str:
    """A one-line reason from a requests/urllib3 exception."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "cannot resolve host"),
                          ("Temporary failure in name resolution", "cannot resolve host"),
                          ("Network is unreachable", "network unreachable"),
                          ("Read timed out", "read timed out"),
                          ("timed out", "timed out"),
                          ("IncompleteRead", "connection dropped"),
                          ("Connection broken", "connection dropped"),
                          ("RemoteDisconnected", "connection dropped"),
                          ("Connection aborted", "connection dropped"),
                          ("Connection reset", "connection dropped")):
        if needle in text:
            return short
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _bars(total: int, done: int, what: str):
    from tqdm.auto import tqdm

    files = tqdm(total=total, initial=done, desc=f"{what}: files", unit="file", leave=True)
    nbytes = tqdm(total=None, desc=f"{what}: data", unit="B", unit_scale=True,
                  unit_divisor=1024, leave=True)
    return files, nbytes


def report_dict(report: FetchReport) -> dict:
    """A JSON-friendly summary of a :class:`FetchReport`."""
    return {"fetched": len(report.fetched), "skipped": len(report.skipped),
            "bytes": report.bytes, "failures": [asdict(f) for f in report.failures]}
