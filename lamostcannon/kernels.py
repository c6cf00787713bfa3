"""Compiled inner loops (numba) of ingest and the test step.

:func:`interpolate_rows` (ingest's resampling) and :func:`normalise_rows` (the continuum's
interpolation between its nodes and the normalisation) each replace a chain of whole-array numpy
operations by one pass over the data with the same floating-point operations in the same order
per element: a product of a ``float64`` and a ``float32`` promotes the ``float32`` first, as numpy
does, and nothing is fused or reassociated (compiled without ``fastmath``, LLVM neither contracts
``a * b + c`` into one rounding nor reorders sums). They therefore give numpy's bits; the tests
check that on real and mock spectra.

:func:`newton_fits` is the test step's bounded Newton iteration run one spectrum at a time
instead of over a batch (the batched numpy version re-forms arrays for thousands of 10 x 10
systems per iteration). Its polynomial evaluation may reorder sums (vectorised dot products), so
it agrees with numpy to rounding (~1e-13 of a formal error on the labels), not bit for bit; the
steps it accepts, its iteration counts and flags are the same (measured; the test allows one
star in 100 to take a threshold decision the other way on some CPU).

numba is imported, and a kernel compiled, on the first call in a process (~7 s for all of them
once per machine; the compiled code is cached on disk, in ``__pycache__`` beside this file or
numba's user cache where that is not writable, and later processes load numba and it in ~0.55 s).
``LAMOSTCANNON_NUMBA=0`` switches every kernel off (the numpy paths run instead), for checks and
for platforms without numba; where numba is present but cannot load or compile them,
:func:`ready` says so once in the log and the numpy paths run too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)

#: True when the compiled kernels are used (numba installed and not switched off). numba itself
#: is imported by :func:`ready` or the first call of a kernel, not with this module.
ENABLED = (os.environ.get("LAMOSTCANNON_NUMBA", "1") != "0"
           and importlib.util.find_spec("numba") is not None)

#: ``CannonModel.test`` calls, and the labelling core's chunks (``Labeller.label``, whatever
#: their split between the dwarf and giant models), with at least this many spectra use
#: :func:`newton_fits` (it saves ~0.12 ms per spectrum; loading numba costs ~0.5 s of CPU per
#: process): small calls, as in a ``label`` run on a few hundred files, never load numba. Per
#: call, so that the same call takes the same path in any process (the catalogue's rows are the
#: same in-process and on Dask).
NEWTON_MIN_SPECTRA = 512
#: Ingest resamples and normalises with :func:`interpolate_rows` and :func:`normalise_rows`
#: once this process has resampled this many spectra, or at once if numba is loaded already
#: (they save ~0.075 ms per spectrum; the same bits either way, so when it starts does not
#: matter). ``LAMOSTCANNON_RESAMPLE_AFTER`` overrides it (read at import, so worker processes
#: inherit it; ``0``: from the first spectrum, as ``bench_e2e.py`` runs ingest).
RESAMPLE_AFTER = int(os.environ.get("LAMOSTCANNON_RESAMPLE_AFTER", "10000"))

_LOCK = threading.RLock()
_RESAMPLED = [0]
_COMPILED: dict = {}
_READY: dict = {}
#: name -> (function, reassociate) of every kernel, in the order they are compiled (a kernel's
#: callees first: numba resolves them as globals when it compiles the caller)
_KERNELS: dict = {}


def use_for_resampling(n: int) -> bool:
    """Whether ingest should resample the next ``n`` spectra with :func:`interpolate_rows`
    (counts them; see :data:`RESAMPLE_AFTER`)."""
    if not ENABLED:
        return False
    _RESAMPLED[0] += n
    return (bool(_COMPILED) or _RESAMPLED[0] > RESAMPLE_AFTER) and ready()


def use_for_normalising() -> bool:
    """Whether spectra should be normalised with :func:`normalise_rows`: once this process has
    resampled :data:`RESAMPLE_AFTER` spectra (ingest resamples each spectrum before normalising
    it, so it is counted once), or at once if numba is loaded already (the same bits either
    way)."""
    return ENABLED and (bool(_COMPILED) or _RESAMPLED[0] > RESAMPLE_AFTER) and ready()


def ready() -> bool:
    """True when the kernels are enabled and work in this process: the first call imports numba
    and runs every kernel once on a tiny input (loading it from the disk cache, or compiling
    it). Any failure there (numba missing or broken, an unsupported platform) is logged once as
    a warning and the numpy paths run instead: a long run never stops for want of a kernel."""
    if not ENABLED:
        return False
    with _LOCK:
        if "ok" not in _READY:
            try:
                _compile()
                _warm_up()
                _READY["ok"] = True
            except Exception as exc:  # the numpy paths compute the same results
                log.warning("compiled kernels unavailable (%s: %s); using the numpy code",
                            type(exc).__name__, exc)
                _READY["ok"] = False
        return _READY["ok"]


def _warm_up() -> None:
    """Each kernel once, on a tiny input of the types ingest and the test step pass."""
    one = np.ones((1, 3), np.float32)
    interpolate_rows(np.array([[0.0, 0.5, 2.0]]), np.array([3], np.int64), one, one,
                     np.ones((1, 3), bool), np.empty((1, 3)), np.empty((1, 3)),
                     np.empty(1, np.int64))
    normalise_rows(np.ones((4, 1)), np.ones((1, 4)), np.ones((1, 1)), np.ones((1, 1)),
                   np.empty((1, 1), np.float32), np.empty((1, 1), np.float32))
    idx = np.zeros(1, np.intp)
    newton_fits(np.ones(1), np.zeros((1, 1)), np.ones((1, 1)), np.zeros((1, 1, 1)),
                np.zeros((1, 1, 1)), idx, idx, np.ones(1), idx, np.full((1, 1), 0.5),
                np.full(1, -1.0), np.ones(1), 5, 1e-3, 1e-9, 1.0, np.zeros((0, 1, 1)),
                np.zeros((0, 1), bool), 0.1, np.empty((1, 1)), np.empty(1),
                np.zeros(1, np.int64), np.zeros(1, bool))


def _jit(fn=None, *, reassociate=False):
    """Register ``fn`` as a kernel: compiled by ``numba.njit`` (with the on-disk cache) on first
    use. ``reassociate=True`` lets LLVM reorder sums and fuse multiply-adds (vectorised dot
    products); only for kernels whose result is not required to match numpy bit for bit."""
    if fn is None:
        return lambda f: _jit(f, reassociate=reassociate)
    _KERNELS[fn.__name__] = (fn, reassociate)

    def call(*args):
        compiled = _COMPILED.get(fn.__name__)
        if compiled is None:
            compiled = _compile()[fn.__name__]
        return compiled(*args)

    call.__name__, call.__doc__, call.py_func = fn.__name__, fn.__doc__, fn
    return call


def _compile() -> dict:
    """Import numba and wrap every kernel (callees first), once per process."""
    with _LOCK:
        if not _COMPILED:
            import numba

            for name, (fn, reassociate) in _KERNELS.items():
                flags = {"reassoc", "contract"} if reassociate else False
                dispatcher = numba.njit(cache=True, nogil=True, fastmath=flags)(fn)
                globals()[name] = dispatcher  # what the callers' compilation resolves
                _COMPILED[name] = dispatcher
    return _COMPILED


@_jit
def interpolate_rows(u, sizes, flux, ivar, good, out_flux, out_ivar, n_ok):
    """Linear interpolation with variance propagation, row by row (ingest step 3).

    For row ``r`` and grid pixel ``p`` with fractional native index ``u = u[r, p]`` (``< 0`` or
    NaN: outside the coverage): ``j = min(floor(u), sizes[r] - 2)``, ``t = u - j``;
    ``flux = (1 - t) f_j + t f_{j+1}``, ``var = (1 - t)^2 / ivar_j + t^2 / ivar_{j+1}`` (the
    variances ``1 / ivar`` in float32, as numpy computes them from float32 inverse variances),
    ``ivar = 1 / var``; zero flux and ivar where either neighbour is bad or ``var`` is not
    positive. Rows need ``sizes[r] >= 2``.

    Parameters
    ----------
    u : float64 (m, P)
    sizes : int64 (m,)
    flux, ivar : float32 (m, W), padded rows
    good : bool (m, W)
    out_flux, out_ivar : float64 (m, P), written
    n_ok : int64 (m,), written: valid grid pixels per row
    """
    m, n_pix = u.shape
    one32 = np.float32(1.0)
    var = np.empty(flux.shape[1], np.float64)
    for r in range(m):
        for k in range(sizes[r]):  # each native pixel's variance once (float32, as numpy)
            var[k] = np.float64(one32 / ivar[r, k]) if good[r, k] else -1.0
        hi = float(sizes[r] - 2)
        count = 0
        for p in range(n_pix):
            x = u[r, p]
            out_flux[r, p] = 0.0
            out_ivar[r, p] = 0.0
            if not x >= 0.0:
                continue
            j = np.floor(x)
            if j > hi:
                j = hi
            t = x - j
            k = int(j)
            v0 = var[k]
            v1 = var[k + 1]
            if v0 < 0.0 or v1 < 0.0:  # a bad neighbour
                continue
            t1 = 1.0 - t
            v = t1 * t1 * v0 + t * t * v1
            if not v > 0.0:
                continue
            out_flux[r, p] = t1 * np.float64(flux[r, k]) + t * np.float64(flux[r, k + 1])
            out_ivar[r, p] = 1.0 / v
            count += 1
        n_ok[r] = count


#: The largest float32, as a float64 (numpy's comparisons with ``np.finfo(np.float32).max``).
_FLOAT32_MAX = 3.4028234663852886e38


@_jit
def normalise_rows(nodes, a, flux, ivar, out_flux, out_ivar):
    """Continuum interpolation and normalisation in one pass (ingest steps 4-5 after the
    node sums): numpy's ``_interpolate_nodes`` and ``_normalise_rows`` of
    :mod:`lamostcannon.spectra`, the same operations in the same order per element.

    Pixel ``p = m k + j`` of row ``r``: ``c = ((a[j,0] n[m] + a[j,1] n[m+1]) + a[j,2] n[m+2]) +
    a[j,3] n[m+3]`` from the row's nodes ``n = nodes[:, r]``; where ``c > 0``, ``c < inf`` and
    ``ivar > 0``: ``flux / c`` and ``(c c) ivar``, cast to float32 if both are below the largest
    float32; elsewhere ``1`` and ``0``.

    Parameters
    ----------
    nodes : float64 (M, S)
    a : float64 (k, 4)
    flux, ivar : float64 (S, P)
    out_flux, out_ivar : float32 (S, P), written
    """
    s, n_pix = flux.shape
    k = a.shape[0]
    n_nodes = nodes.shape[0]
    col = np.empty(n_nodes, np.float64)
    cont = np.empty((n_nodes - 3) * k, np.float64)
    for r in range(s):
        for m in range(n_nodes):
            col[m] = nodes[m, r]
        for m in range(n_nodes - 3):
            for j in range(k):
                c = col[m] * a[j, 0]
                c = c + col[m + 1] * a[j, 1]
                c = c + col[m + 2] * a[j, 2]
                cont[m * k + j] = c + col[m + 3] * a[j, 3]
        for p in range(n_pix):  # branch-free, so that it vectorises
            c = cont[p]
            iv = ivar[r, p]
            ok = (c > 0.0) & (c < np.inf) & (iv > 0.0)
            safe = c if ok else 1.0
            nf = flux[r, p] / safe
            ni = (safe * safe) * iv
            ok = ok & (abs(nf) < _FLOAT32_MAX) & (ni < _FLOAT32_MAX)
            out_flux[r, p] = np.float32(nf) if ok else np.float32(1.0)
            out_ivar[r, p] = np.float32(ni) if ok else np.float32(0.0)


# ------------------------------------------------------------------------------------------------
# The test step's bounded Newton iteration, one spectrum at a time
# ------------------------------------------------------------------------------------------------

@_jit(reassociate=True)
def _quartic_at(p0, g0, h0, h1, h2, qi, qj, q_mult, h_full, x, quad, h1x, h2x, hflat, gflat,
                grad, hess):
    """chi2, gradient (into ``grad``) and Hessian (into ``hess``) of one spectrum's quartic at
    ``x``: :meth:`lamostcannon.cannon._Quartic.all` for one row (the other arguments are
    work buffers)."""
    n_q, n_l = h1.shape
    for q in range(n_q):
        quad[q] = x[qi[q]] * x[qj[q]]
    for q in range(n_q):
        s = 0.0
        for k in range(n_l):
            s += h1[q, k] * x[k]
        h1x[q] = s
        s = 0.0
        for k in range(n_q):
            s += h2[q, k] * quad[k]
        h2x[q] = s
    val = p0
    for q in range(n_q):
        hflat[q] = h0[q] + h1x[q] + h2x[q]
        gflat[q] = 0.5 * h1x[q] + h0[q] + h2x[q] / 3.0
        val += (0.5 * h0[q] + h1x[q] / 6.0 + h2x[q] / 12.0) * (quad[q] * q_mult[q])
    for k in range(n_l):
        s = g0[k]
        for m in range(n_l):
            hess[k, m] = hflat[h_full[k * n_l + m]]
            s += gflat[h_full[k * n_l + m]] * x[m]
        grad[k] = s
        val += g0[k] * x[k]
    return val


@_jit
def _cholesky_step(h, g, low, step):
    """``step = -h^-1 g`` by Cholesky; False (step untouched) where ``h`` is not positive
    definite: a pivot ``<= 1e-13`` times the mean absolute diagonal, as
    :func:`lamostcannon.cannon._newton_step` decides it."""
    n = g.size
    scale = 0.0
    for j in range(n):
        scale += h[j, j]
    scale = abs(scale) / n + 1e-300
    for j in range(n):
        s = h[j, j]
        for k in range(j):
            s -= low[j, k] * low[j, k]
        if not s > 1e-13 * scale:
            return False
        d = np.sqrt(s)
        low[j, j] = d
        for i in range(j + 1, n):
            s = h[i, j]
            for k in range(j):
                s -= low[i, k] * low[j, k]
            low[i, j] = s / d
    for j in range(n):  # forward: low y = -g
        s = -g[j]
        for k in range(j):
            s -= low[j, k] * step[k]
        step[j] = s / low[j, j]
    for j in range(n - 1, -1, -1):  # back: low^T x = y
        s = step[j]
        for k in range(j + 1, n):
            s -= low[k, j] * step[k]
        step[j] = s / low[j, j]
    return True


@_jit
def newton_fits(p0, g0, h0, h1, h2, qi, qj, q_mult, h_full, x0, lo, hi, max_iter, xtol_newton,
                xtol, radius0, target, target_ok, join, x_out, f_out, n_it, conv):
    """:func:`lamostcannon.cannon._newton` spectrum by spectrum (see its docstring for the
    iteration: projected Newton at the bounds, saddle-free steps where the Hessian is
    indefinite, a trust radius, and the stop on joining an explored basin ``target`` (R, n, L)
    where ``target_ok`` (R, n)). Writes ``x_out`` (n, L), ``f_out``, ``n_it``, ``conv`` (n,).
    The polynomial of spectrum ``i``: ``p0[i]``, ``g0[i]`` (L,), ``h0[i]`` (Q,), ``h1[i]``
    (Q, L), ``h2[i]`` (Q, Q).
    """
    n, n_l = x0.shape
    n_q = h0.shape[1]
    n_r = target.shape[0]
    quad = np.empty(n_q)
    h1x = np.empty(n_q)
    h2x = np.empty(n_q)
    hflat = np.empty(n_q)
    gflat = np.empty(n_q)
    x = np.empty(n_l)
    xt = np.empty(n_l)
    g = np.empty(n_l)
    gt = np.empty(n_l)
    gs = np.empty(n_l)
    step = np.empty(n_l)
    h = np.empty((n_l, n_l))
    ht = np.empty((n_l, n_l))
    hs = np.empty((n_l, n_l))
    low = np.empty((n_l, n_l))
    held = np.empty(n_l, np.bool_)
    lo_b = lo + 1e-9 * (hi - lo)
    hi_b = hi - 1e-9 * (hi - lo)
    for i in range(n):
        for k in range(n_l):
            x[k] = min(max(x0[i, k], lo[k]), hi[k])
        f = _quartic_at(p0[i], g0[i], h0[i], h1[i], h2[i], qi, qj, q_mult, h_full, x, quad, h1x,
                        h2x, hflat, gflat, g, h)
        tol_f = 1e-13 * max(abs(p0[i]), 1.0)
        rad = radius0
        it = 0
        done = False
        for _ in range(max_iter):
            for k in range(n_l):
                held[k] = (x[k] <= lo_b[k] and g[k] > 0) or (x[k] >= hi_b[k] and g[k] < 0)
            for k in range(n_l):
                gs[k] = 0.0 if held[k] else g[k]
                for m in range(n_l):
                    if held[k] or held[m]:
                        hs[k, m] = 1.0 if k == m else 0.0
                    else:
                        hs[k, m] = h[k, m]
            posdef = _cholesky_step(hs, gs, low, step)
            if not posdef:  # saddle-free step with |eigenvalues|
                for k in range(n_l):
                    for m in range(n_l):
                        v = hs[k, m]
                        if np.isnan(v):
                            v = 0.0
                        elif np.isinf(v):
                            v = 1.7976931348623157e308 if v > 0 else -1.7976931348623157e308
                        low[k, m] = v
                e, vec = np.linalg.eigh(low)
                e = np.abs(e)
                floor = 1e-6 * e.max() + 1e-300
                for k in range(n_l):
                    if e[k] < floor:
                        e[k] = floor
                for k in range(n_l):
                    step[k] = 0.0
                for m in range(n_l):
                    c = 0.0
                    for k in range(n_l):
                        c += vec[k, m] * gs[k]
                    c /= e[m]
                    for k in range(n_l):
                        step[k] -= vec[k, m] * c
            finite = True
            for k in range(n_l):
                if not np.isfinite(step[k]):
                    finite = False
            if not finite:  # NaN/inf in the polynomial: give up on this spectrum
                break
            length = 0.0
            for k in range(n_l):
                length += step[k] * step[k]
            length = np.sqrt(length)
            short = length > rad
            if short:
                for k in range(n_l):
                    step[k] *= rad / length
            dx = 0.0
            for k in range(n_l):
                xt[k] = min(max(x[k] + step[k], lo[k]), hi[k])
                dx = max(dx, abs(xt[k] - x[k]))
            ft = _quartic_at(p0[i], g0[i], h0[i], h1[i], h2[i], qi, qj, q_mult, h_full, xt,
                             quad, h1x, h2x, hflat, gflat, gt, ht)
            accept = ft <= f + tol_f
            if accept:
                x[:] = xt
                g[:] = gt
                h[:, :] = ht
                f = ft
            it += 1
            taken = min(length, rad)
            if accept:
                if short:
                    rad = 2.0 * rad
            else:
                rad = 0.25 * taken
            full = accept and posdef and not short
            if (full and dx < xtol_newton) or rad < xtol or (accept and dx < xtol):
                done = True
            for r in range(n_r):
                if done:
                    break
                if target_ok[r, i]:
                    dist = 0.0
                    for k in range(n_l):
                        dist = max(dist, abs(x[k] - target[r, i, k]))
                    if dist < join:
                        done = True
            if done:
                break
        x_out[i, :] = x
        f_out[i] = f
        n_it[i] = it
        conv[i] = done
