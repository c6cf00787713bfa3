"""A CannonModel trained on spectra of a random quadratic model (simulate, then recover), shared
by the catalogue tests and the Dask-cluster test."""

from __future__ import annotations

import numpy as np

from lamostcannon import cannon, spectra

P = spectra.N_PIXELS


def teacher(names, rng, n=500, return_data=False):
    """Train a model on ``n`` spectra of a random quadratic model with labels ``names``.

    Labels are centred on a dwarf (a giant when ``mg_fe`` is a label, as in the giant model).
    Returns ``(model, labels)``, or ``(model, labels, flux)`` with ``return_data``.
    """
    L, T = len(names), cannon.n_terms(len(names))
    theta = np.zeros((P, T))
    theta[:, 0] = 1 - 0.3 * rng.random(P) ** 3
    theta[:, 1:L + 1] = 0.02 * rng.standard_normal((P, L))
    theta[:, L + 1:] = 0.003 * rng.standard_normal((P, T - L - 1))
    x = 0.8 * rng.standard_normal((n, L))
    centre = {"teff": 5800.0, "logg": 4.3, "vmic": 1.2, "fe_h": -0.2}
    if "mg_fe" in names:
        centre.update(teff=4700.0, logg=2.5)
    scale = {"teff": 300.0, "logg": 0.3, "vmic": 0.3, "fe_h": 0.3}
    lab = (np.array([centre.get(k, 0.1) for k in names])
           + x * np.array([scale.get(k, 0.1) for k in names]))
    flux = cannon.vectorize(x) @ theta.T + 0.01 * rng.standard_normal((n, P))
    model = cannon.CannonModel(names, wavelength=spectra.common_wavelength())
    model.train(lab, flux, np.full((n, P), 1e4))
    if return_data:
        return model, lab, flux
    return model, lab
