"""Known-answer tests of the Galactocentric conventions and the actions (lamostcannon.kinematics)."""

from __future__ import annotations

import numpy as np
import pytest

astropy_units = pytest.importorskip("astropy.units")
pytest.importorskip("galpy")

import astropy.coordinates as coord  # noqa: E402
import astropy.units as u  # noqa: E402

from lamostcannon import kinematics as kin  # noqa: E402


def _observe(X, Y, z, vX, vY, vz):
    """Right-handed Galactocentric (this module's frame) -> ICRS observables via astropy."""
    X, Y, z, vX, vY, vz = (np.atleast_1d(np.asarray(a, float)) for a in (X, Y, z, vX, vY, vz))
    gc = coord.SkyCoord(x=-X * u.kpc, y=-Y * u.kpc, z=z * u.kpc,
                        v_x=-vX * u.km / u.s, v_y=-vY * u.km / u.s, v_z=vz * u.km / u.s,
                        frame=kin.astropy_frame())
    icrs = gc.transform_to(coord.ICRS())
    return (icrs.ra.deg, icrs.dec.deg, icrs.distance.to_value(u.kpc),
            icrs.pm_ra_cosdec.to_value(u.mas / u.yr), icrs.pm_dec.to_value(u.mas / u.yr),
            icrs.radial_velocity.to_value(u.km / u.s))


def _random_stars(rng, n):
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return (ra, dec, rng.uniform(0.05, 4.0, n), rng.normal(0, 8, n), rng.normal(0, 8, n),
            rng.normal(0, 50, n))


def test_galpy_solarmotion_is_relative_to_lsr():
    assert kin.GALPY_SOLARMOTION == pytest.approx((-11.1, 12.24, 7.25))
    assert kin.galpy_frame_kwargs()["vo"] + kin.GALPY_SOLARMOTION[1] == pytest.approx(232.24)


def test_sun_position_and_velocity():
    # A star 1 pc from the Sun (in any direction) at rest relative to the Sun moves like the Sun.
    ra, dec = np.array([0.0, 266.4, 120.0]), np.array([0.0, -28.9, 40.0])
    d = np.full(3, 1e-6)
    zero = np.zeros(3)
    df = kin.kinematics(ra, dec, d, zero, zero, zero, with_actions=False)
    np.testing.assert_allclose(df["X"], 8.0, atol=1e-5)
    np.testing.assert_allclose(df["Y"], 0.0, atol=1e-5)
    np.testing.assert_allclose(df["z"], 0.025, atol=1e-5)
    np.testing.assert_allclose(df["R"], 8.0, atol=1e-5)
    np.testing.assert_allclose(df["phi"], 0.0, atol=1e-5)
    np.testing.assert_allclose(df["vR"], -11.1, atol=1e-4)    # towards the Galactic centre
    np.testing.assert_allclose(df["vT"], -232.24, atol=1e-4)  # right-handed: rotation is vT < 0
    np.testing.assert_allclose(df["vz"], 7.25, atol=1e-4)
    np.testing.assert_allclose(df["vphi"], 232.24, atol=1e-4)
    assert (df["kin_flag"] == 0).all()


def test_galactic_centre_direction_is_towards_smaller_X():
    # 1 kpc towards l = 0, b = 0 is 1 kpc closer to the centre; l = 90 is at negative Y.
    gal = coord.SkyCoord(l=[0.0, 90.0] * u.deg, b=[0.0, 0.0] * u.deg, frame="galactic").icrs
    df = kin.kinematics(gal.ra.deg, gal.dec.deg, [1.0, 1.0], [0, 0], [0, 0], [0, 0],
                        with_actions=False)
    assert df["X"].iloc[0] == pytest.approx(7.0, abs=1e-3)
    assert df["Y"].iloc[1] == pytest.approx(-1.0, abs=1e-3)
    assert df["phi"].iloc[1] < 0  # ahead of the Sun along the rotation


def test_circular_orbit_has_zero_radial_and_vertical_action():
    from galpy.potential import MWPotential2014, vcirc

    R = np.array([6.0, 8.5, 11.0])
    phi = np.array([0.3, -0.2, 1.0])
    vc = np.array([vcirc(MWPotential2014, r / 8.0) for r in R]) * 220.0
    X, Y = R * np.cos(phi), R * np.sin(phi)
    # right-handed: rotation goes along -phi-hat; phi-hat = (-sin, cos)
    vX, vY = vc * np.sin(phi), -vc * np.cos(phi)
    obs = _observe(X, Y, np.zeros(3), vX, vY, np.zeros(3))
    df = kin.kinematics(*obs)
    np.testing.assert_allclose(df["R"], R, atol=1e-8)
    np.testing.assert_allclose(df["phi"], phi, atol=1e-8)
    np.testing.assert_allclose(df["vT"], -vc, atol=1e-6)
    np.testing.assert_allclose(df["vR"], 0.0, atol=1e-6)
    np.testing.assert_allclose(df["JR"], 0.0, atol=0.5)      # kpc km/s
    np.testing.assert_allclose(df["Jz"], 0.0, atol=0.5)
    np.testing.assert_allclose(df["Jphi"], -R * vc, rtol=1e-8)
    assert (df["kin_flag"] == 0).all()


def test_agrees_with_astropy_galactocentric(rng):
    obs = _random_stars(rng, 500)
    df = kin.kinematics(*obs, with_actions=False)
    sc = coord.SkyCoord(ra=obs[0] * u.deg, dec=obs[1] * u.deg, distance=obs[2] * u.kpc,
                        pm_ra_cosdec=obs[3] * u.mas / u.yr, pm_dec=obs[4] * u.mas / u.yr,
                        radial_velocity=obs[5] * u.km / u.s)
    g = sc.transform_to(kin.astropy_frame())
    x, y, z = (g.cartesian.xyz.to_value(u.kpc))
    vx, vy, vz = g.velocity.d_xyz.to_value(u.km / u.s)
    R = np.hypot(x, y)
    np.testing.assert_allclose(df["X"], -x, atol=1e-8)
    np.testing.assert_allclose(df["Y"], -y, atol=1e-8)
    np.testing.assert_allclose(df["z"], z, atol=1e-8)
    np.testing.assert_allclose(df["R"], R, atol=1e-8)
    np.testing.assert_allclose(df["phi"], np.arctan2(-y, -x), atol=1e-8)
    np.testing.assert_allclose(df["vR"], (x * vx + y * vy) / R, atol=1e-5)
    np.testing.assert_allclose(df["vT"], (x * vy - y * vx) / R, atol=1e-5)  # astropy is right-handed
    np.testing.assert_allclose(df["vz"], vz, atol=1e-5)


def test_actions_match_galpy_orbit_methods(rng):
    from galpy.orbit import Orbit
    from galpy.potential import MWPotential2014

    obs = _random_stars(rng, 5)
    df = kin.kinematics(*obs)
    o = Orbit(np.column_stack(obs), **kin.galpy_frame_kwargs())
    kw = dict(pot=MWPotential2014, type="staeckel", delta=0.4)
    np.testing.assert_allclose(df["JR"], o.jr(**kw), rtol=1e-6)
    np.testing.assert_allclose(df["Jz"], o.jz(**kw), rtol=1e-6)
    np.testing.assert_allclose(df["Jphi"], -np.asarray(o.jp(**kw)), rtol=1e-6)  # galpy: prograde > 0


def test_invalid_and_unbound_rows_are_nan_and_flagged():
    ok = (150.0, 30.0, 1.0, 2.0, -3.0, 10.0)
    rows = [
        ok,
        (150.0, 30.0, np.nan, 2.0, -3.0, 10.0),    # no distance
        (150.0, 30.0, -1.0, 2.0, -3.0, 10.0),      # negative distance
        (np.nan, 30.0, 1.0, 2.0, -3.0, 10.0),      # no position
        (150.0, 30.0, 1.0, 2.0, -3.0, np.nan),     # no radial velocity
        (150.0, 30.0, 1.0, 2.0, -3.0, 3000.0),     # unbound
    ]
    df = kin.kinematics(*np.array(rows).T, with_energy=True)
    assert list(df["kin_flag"]) == [0, kin.FLAG_BAD_POSITION, kin.FLAG_BAD_POSITION,
                                    kin.FLAG_BAD_POSITION, kin.FLAG_BAD_VELOCITY, kin.FLAG_UNBOUND]
    assert df.iloc[0].notna().all()
    assert df.iloc[1:4].drop(columns="kin_flag").isna().all().all()
    assert np.isfinite(df.loc[4, ["R", "z", "X", "Y"]].to_numpy(float)).all()
    assert df.loc[4, ["vR", "vT", "JR", "Jphi", "Jz"]].isna().all()
    assert df.loc[5, "E"] > 0 and df.loc[5, ["JR", "Jphi", "Jz"]].isna().all()


def test_chunking_and_table_interface(rng):
    import pandas as pd

    obs = _random_stars(rng, 7)
    table = pd.DataFrame({"ra": obs[0], "dec": obs[1], "r_est": obs[2] * 1000.0, "pmra": obs[3],
                          "pmdec": obs[4], "rv": obs[5]}, index=np.arange(10, 17))
    table.loc[12, "r_est"] = -5.0
    one = kin.kinematics_from_table(table)
    chunked = kin.kinematics_from_table(table, chunk_size=3)
    assert list(one.index) == list(table.index)
    pd.testing.assert_frame_equal(one, chunked)
    assert one.loc[12, "kin_flag"] == kin.FLAG_BAD_POSITION
    with pytest.raises(KeyError, match="r_est"):
        kin.kinematics_from_table(table.drop(columns="r_est"))
    with pytest.raises(ValueError, match="expected 7"):
        kin.kinematics(obs[0], obs[1][:3], *obs[2:])


def test_astropy_galactocentric_gives_disk_rotation_a_negative_phi_velocity():
    """What the README says about astropy's frame: in its (right-handed) Galactocentric
    cylindrical representation the disk rotates towards *decreasing* phi, so the Sun's
    R dphi/dt is negative, like our vT; our vphi (= -vT) and Jphi_prograde (= -Jphi) are the
    positive-for-rotation columns of Table 1."""
    frame = kin.astropy_frame()
    sun = coord.SkyCoord(ra=0 * u.deg, dec=0 * u.deg, distance=1e-6 * u.kpc,
                         pm_ra_cosdec=0 * u.mas / u.yr, pm_dec=0 * u.mas / u.yr,
                         radial_velocity=0 * u.km / u.s).transform_to(frame)
    cyl = sun.represent_as(coord.CylindricalRepresentation,
                           coord.CylindricalDifferential)
    r_dphi = (cyl.rho * cyl.differentials["s"].d_phi).to(u.km / u.s,
                                                          equivalencies=u.dimensionless_angles())
    assert r_dphi.value == pytest.approx(-232.24, abs=0.5)
    k = kin.kinematics([0.0], [0.0], [1e-6], [0.0], [0.0], [0.0])
    assert k["vT"][0] == pytest.approx(-232.24, abs=0.5) and k["vphi"][0] > 0
    assert k["Jphi"][0] < 0


def test_catalogue_has_both_signs_with_their_conventions():
    import pandas as pd

    from lamostcannon import catalog

    stars = pd.DataFrame({"source_id": [7], "rv": [0.0]})
    gaia = pd.DataFrame({"source_id": [7], "ra": [0.0], "dec": [0.0], "pmra": [0.0],
                         "pmdec": [0.0]})
    out = catalog.add_kinematics(stars, gaia, pd.DataFrame({"source_id": [7], "r_est": [1.0]}))
    assert out["vphi"][0] == pytest.approx(-out["vT"][0]) and out["vphi"][0] > 200
    assert out["Jphi_prograde"][0] == pytest.approx(-out["Jphi"][0]) and out["Jphi_prograde"][0] > 0
    for name, word in (("vT", "< 0"), ("vphi", "> 0"), ("Jphi", "< 0"), ("Jphi_prograde", "> 0")):
        unit, desc = catalog._describe(name)
        assert word in desc and len(desc) <= 68, (name, desc)


def test_parallel_chunks_equal_the_one_process_path(rng):
    """Chunks on worker processes (parallel.ordered_map) give the one-process result: same
    code per star, so equal to float tolerance, flags exactly, rows in input order."""
    import pandas as pd

    obs = [np.asarray(a) for a in _random_stars(rng, 1500)]
    obs[2][[3, 700]] = np.nan                          # bad positions
    obs[5][[10, 1499]] = np.nan                        # no radial velocity
    obs[5][20] = 3000.0                                # unbound
    index = np.arange(5000, 6500)
    one = kin.kinematics(*obs, with_energy=True, n_workers=1, index=index)
    par = kin.kinematics(*obs, with_energy=True, n_workers=2, chunk_size=400, index=index)
    assert list(par.columns) == list(one.columns) and list(par.index) == list(index)
    np.testing.assert_array_equal(par["kin_flag"].to_numpy(), one["kin_flag"].to_numpy())
    pd.testing.assert_frame_equal(par, one, check_exact=False, rtol=1e-12, atol=1e-9)
    assert one["kin_flag"].iloc[[3, 700, 10, 1499, 20]].tolist() == [
        kin.FLAG_BAD_POSITION, kin.FLAG_BAD_POSITION, kin.FLAG_BAD_VELOCITY,
        kin.FLAG_BAD_VELOCITY, kin.FLAG_UNBOUND]
    assert np.isfinite(par["Jz"]).sum() > 1000          # most stars have actions


def test_openmp_threads_follows_the_limit_of_galpys_openmp():
    from threadpoolctl import threadpool_limits

    assert kin.openmp_threads() >= 1
    with threadpool_limits(1, user_api="openmp"):
        assert kin.openmp_threads() == 1
