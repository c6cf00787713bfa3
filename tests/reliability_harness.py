"""Attacks on the package, run for real, for ``tests/test_reliability.py`` and
``benchmarks/bench_reliability.py`` (which repeats them more often and records the figures).

Every function returns a dict of counts, so that a test can assert on them and the benchmark can
write them to JSON. Linux only where noted (``/proc`` is read to find a command's workers).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------ processes

def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), rest[0]


def descendants(pid: int) -> set[int]:
    """Every living (non-zombie) descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st and st[1] != "Z":
                children.setdefault(st[0], []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids) -> set[int]:
    """The pids among ``pids`` that still run (zombies count as dead)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[1] != "Z"}


def workers_of(pid: int) -> set[int]:
    """The pool workers of ``pid``: its children that run ``multiprocessing`` spawn code and are
    not the resource tracker."""
    out = set()
    for c in descendants(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            out.add(c)
    return out


def wait_for(predicate, timeout: float, step: float = 0.02):
    """Poll ``predicate()`` until it returns something truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                LAMOSTCANNON_WORKERS="2")


# ------------------------------------------------------------------------------ a small model

def train_small_model(lamost_dir: Path, work: Path, n_files: int = 160) -> Path:
    """A 3-label model on the first ``n_files`` real DR10 spectra's training stars."""
    from lamostcannon import real
    from lamostcannon.cannon import CannonModel
    from lamostcannon.spectra import common_wavelength

    dr10 = Path(lamost_dir) / "dr10"
    sample = real.build_sample(real.RealSources(dr10, dr10 / "catalog.csv"), limit=n_files,
                               n_workers=1, store_path=work / "train.zarr")
    lab, flux, ivar = sample.subset(sample.table["train"].to_numpy())
    model = CannonModel(list(sample.label_names), common_wavelength()).train(lab, flux, ivar)
    return model.write(work / "model_small.fits", overwrite=True)


# ------------------------------------------------------------------------------ kill -9 of a run

INGEST_SCRIPT = textwrap.dedent("""
    import sys
    from lamostcannon.store import ingest
    if __name__ == "__main__":
        ingest(sys.argv[1], sys.argv[2], n_workers=2, chunk_size=8, commit_rows=64,
               chunk_rows=16, progress=False)
""")


def label_command(model: Path, inputs, output: Path, *, chunk_size: int = 8) -> list[str]:
    return [sys.executable, "-m", "lamostcannon", "label", "--model", str(model),
            *map(str, inputs), "-o", str(output), "--workers", "2", "--chunk-size",
            str(chunk_size), "--no-progress", "--overwrite"]


def ingest_command(folder: Path, store: Path, script_dir: Path) -> list[str]:
    script = script_dir / "ingest_run.py"
    script.write_text(INGEST_SCRIPT)
    return [sys.executable, str(script), str(folder), str(store)]


def kill_parent_count_orphans(cmd, *, n_kills: int, settle_s: float = 0.3,
                              grace_s: float = 3.0) -> dict:
    """Start ``cmd`` (stdout/stderr to pipes) ``n_kills`` times, SIGKILL it once its two workers
    run, and count workers still alive ``grace_s`` later and callers whose read to EOF of the
    pipes did not end within 30 s."""
    out = {"kills": 0, "surviving_workers": 0, "hung_pipes": 0, "workers_seen": 0,
           "max_seconds_to_eof": 0.0, "not_killed": 0}
    for _ in range(n_kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env())
        workers = wait_for(lambda: (w := workers_of(proc.pid)) and len(w) >= 2 and w, 120)
        time.sleep(settle_s)
        workers = workers_of(proc.pid) | (workers or set())
        if proc.poll() is not None:
            out["not_killed"] += 1
            proc.communicate()
            continue
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out["hung_pipes"] += 1
            proc.stdout.close()
            proc.stderr.close()
            proc.wait()
        out["max_seconds_to_eof"] = max(out["max_seconds_to_eof"], time.monotonic() - t0)
        out["kills"] += 1
        out["workers_seen"] += len(workers)
        wait_for(lambda: not alive(tree), grace_s)
        left = alive(tree)
        out["surviving_workers"] += len(left)
        for pid in left:  # clean up what the test found
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return out


def kill_workers_during_run(cmd, *, times: int = 1, timeout: float = 300) -> dict:
    """Run ``cmd``; once its workers run, SIGKILL one of them; with ``times=2`` also SIGKILL the
    worker started to replace it (so that one task's worker dies twice). Returns the exit code,
    the output and the pids killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    killed = []
    try:
        first = wait_for(lambda: (w := workers_of(proc.pid)) and len(w) >= 2 and w, 120)
        if not first:
            raise RuntimeError("the workers never started")
        time.sleep(0.5)  # let them take tasks
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        if times >= 2:
            new = wait_for(lambda: workers_of(proc.pid) - first, 60)
            if new:
                os.kill(min(new), signal.SIGKILL)
                killed.append(min(new))
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr,
            "killed": killed}


# ------------------------------------------------------------------------------ the write lock

def _open_and_hold(path, barrier, queue, hold_s):
    """Child: wait for the partner, try to open ``path`` for writing, report what happened."""
    from lamostcannon.store import SpectraStore

    try:
        barrier.wait(timeout=30)
        try:
            store = SpectraStore(path, "a")
        except RuntimeError as exc:
            queue.put(("busy", str(exc), 0.0, 0.0))
            return
        t0 = time.monotonic()
        time.sleep(hold_s)
        t1 = time.monotonic()
        store.close()
        queue.put(("held", "", t0, t1))
    except BaseException as exc:  # report, never hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}", 0.0, 0.0))


def simultaneous_openings(path, n_pairs: int, hold_s: float = 0.02, *,
                          opener=None) -> dict:
    """Open ``path`` for writing from ``n_pairs`` pairs of forked processes released together.

    Returns counts: ``double`` (pairs whose two holds overlapped in time), ``held``, ``busy``,
    ``errors`` (with the first error text).
    """
    ctx = mp.get_context("fork")
    out = {"pairs": n_pairs, "openings": 2 * n_pairs, "double": 0, "held": 0, "busy": 0,
           "errors": 0, "first_error": "", "busy_message": ""}
    for _ in range(n_pairs):
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=opener or _open_and_hold, args=(path, barrier, queue, hold_s))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        held = [g for g in got if g[0] == "held"]
        out["held"] += len(held)
        out["busy"] += sum(g[0] == "busy" for g in got)
        for g in got:
            if g[0] == "busy" and not out["busy_message"]:
                out["busy_message"] = g[1]
            if g[0] == "error":
                out["errors"] += 1
                out["first_error"] = out["first_error"] or g[1]
        if len(held) == 2 and held[0][2] < held[1][3] and held[1][2] < held[0][3]:
            out["double"] += 1
    return out


def _ingest_child(files, store, barrier, queue):
    from lamostcannon.store import ingest

    try:
        barrier.wait(timeout=30)
        report = ingest(files, store, n_workers=1, progress=False)
        queue.put(("ok", report[["source", "status", "row"]].to_dict("list")))
    except (RuntimeError, FileExistsError) as exc:
        queue.put(("refused", f"{type(exc).__name__}: {exc}"))
    except BaseException:
        import traceback

        queue.put(("error", traceback.format_exc()[-3000:]))


def racing_ingests(dr10_files, root: Path, n_trials: int, per_run: int = 6) -> dict:
    """``n_trials`` times: two forked ingests of different files into one new store, released
    together; then each run is repeated alone. Counts rows lost (reported stored but absent, or
    absent after the repeats), rows whose spectrum does not match its metadata, and refusal
    messages that are not one line."""
    from lamostcannon import spectra as sp
    from lamostcannon.store import SpectraStore, ingest

    ctx = mp.get_context("fork")
    out = {"trials": n_trials, "both_ran": 0, "one_refused": 0, "lost_rows": 0,
           "mismatched_rows": 0, "errors": 0, "multi_line_messages": 0, "first_error": "",
           "refusal": ""}
    for t in range(n_trials):
        store = Path(root) / f"race{t}.zarr"
        sets = [dr10_files[(2 * t) * per_run:(2 * t + 1) * per_run],
                dr10_files[(2 * t + 1) * per_run:(2 * t + 2) * per_run]]
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_ingest_child, args=([str(f) for f in fs], store, barrier,
                                                         queue)) for fs in sets]
        for p in procs:
            p.start()
        got = [queue.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
        kinds = sorted(g[0] for g in got)
        if "error" in kinds:
            out["errors"] += 1
            out["first_error"] = out["first_error"] or next(g[1] for g in got if g[0] == "error")
            continue
        out["both_ran"] += kinds == ["ok", "ok"]
        out["one_refused"] += "refused" in kinds
        for g in got:
            if g[0] == "refused":
                out["refusal"] = out["refusal"] or g[1]
                out["multi_line_messages"] += "\n" in g[1].strip()
        reported = {s: r for g in got if g[0] == "ok"
                    for s, st, r in zip(g[1]["source"], g[1]["status"], g[1]["row"])
                    if st == "stored"}
        meta = SpectraStore(store).read_meta(["source"])["source"].tolist()
        out["lost_rows"] += sum(r >= len(meta) or meta[r] != s for s, r in reported.items())
        for fs in sets:  # repeat alone: afterwards every file is stored exactly once
            ingest([str(f) for f in fs], store, n_workers=1, progress=False)
        st = SpectraStore(store)
        meta = st.read_meta(["source"])["source"]
        want = {os.path.abspath(f) for fs in sets for f in fs}
        out["lost_rows"] += len(want - set(meta))
        flux, ivar = st.read()
        for k in (0, len(meta) - 1):
            f, i = sp.preprocess(sp.read_lamost(meta[k]))
            out["mismatched_rows"] += not (np.array_equal(f, flux[k])
                                           and np.array_equal(i, ivar[k]))
        out["mismatched_rows"] += (len(meta) != len(want)) + (not meta.is_unique)
    return out


# ------------------------------------------------------------------------------ hostile files

def fits_header_block(cards: dict) -> bytes:
    """One 2880-byte FITS header block with ``cards`` (ints, bools, strings) and END."""
    lines = []
    for key, value in cards.items():
        if isinstance(value, bool):
            text = "T" if value else "F"
        elif isinstance(value, str):
            text = f"'{value:<8}'"
        else:
            text = str(value)
        lines.append(f"{key:<8}= {text:>20}".ljust(80))
    lines.append("END".ljust(80))
    block = "".join(lines).encode("ascii")
    return block + b" " * (-len(block) % 2880)


def write_gzip_bomb(path: Path, n_bytes: int) -> Path:
    """A gzip file that inflates to ``n_bytes``: a FITS primary header that declares a matching
    image, then zeros. Streamed: a few MB of memory whatever ``n_bytes``."""
    import zlib

    header = fits_header_block({"SIMPLE": True, "BITPIX": 8, "NAXIS": 1,
                                "NAXIS1": n_bytes - 2880})
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(comp.compress(header))
        left = n_bytes - len(header)
        while left > 0:
            fh.write(comp.compress(zeros[:min(left, len(zeros))]))
            left -= len(zeros)
        fh.write(comp.flush())
    return path


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from lamostcannon import spectra

    def peak_kb():  # VmHWM: this process's own peak (ru_maxrss can carry the parent's over exec)
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    normal = spectra.read_lamost(sys.argv[1])
    base = peak_kb()
    reason = ""
    if len(sys.argv) > 2:
        try:
            spectra.read_lamost(sys.argv[2])
        except spectra.SpectrumReadError as exc:
            reason = exc.reason
    print(base, peak_kb(), reason, sep="\t")
""")


def bomb_peak_rss(normal_file: Path, bomb: Path) -> dict:
    """Peak RSS (MB) of a process that reads one real spectrum, against one that then also
    tries the bomb; and the reason the bomb was refused."""
    def run(*files):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, *map(str, files)],
                             capture_output=True, text=True, env=_env(), timeout=600)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        base, peak, reason = out.stdout.rstrip("\n").split("\t")
        return int(base) / 1024, int(peak) / 1024, reason

    normal_peak = run(normal_file)[1]
    _, bomb_peak, reason = run(normal_file, bomb)
    return {"bomb_bytes": os.path.getsize(bomb), "normal_rss_mb": normal_peak,
            "bomb_rss_mb": bomb_peak, "ratio": bomb_peak / normal_peak, "reason": reason}
