"""validation.truth_recovery: a catalogue's recovery of the mock truth against a null catalogue."""

import numpy as np
import pandas as pd
import pytest

from lamostcannon import validation

SKILL = {"dwarf": {"o_fe": {"skill": True}, "eu_fe": {"skill": False}},
         "giant": {"o_fe": {"skill": True}}}


def _tables(n=400, seed=1):
    rng = np.random.default_rng(seed)
    true_o = rng.normal(0.2, 0.15, n)
    true_eu = rng.normal(0.1, 0.1, n)
    giant = rng.random(n) < 0.4
    stars = pd.DataFrame({"designation": [f"J{i:05d}" for i in range(n)], "giantmodel": giant,
                          "quality_flag": np.where(rng.random(n) < 0.1, 4, 0),
                          "o_fe": true_o + rng.normal(0, 0.05, n),      # learned
                          "eu_fe": np.full(n, true_eu.mean())})         # the training mean
    truth = pd.DataFrame({"designation": stars["designation"][::-1].to_numpy(),
                          "o_fe": true_o[::-1], "eu_fe": true_eu[::-1]})
    return stars, truth


def test_learned_label_beats_the_mean_and_the_null_catalogue_does_not():
    stars, truth = _tables()
    out = validation.truth_recovery(stars, truth, {"dwarf": ["o_fe", "eu_fe"], "giant": ["o_fe"]},
                                    skill=SKILL)
    assert set(out.index) == {("dwarf", "o_fe"), ("dwarf", "eu_fe"), ("giant", "o_fe")}
    o = out.loc[("dwarf", "o_fe")]
    assert o["scatter"] == pytest.approx(0.05, rel=0.2) and o["spread"] == pytest.approx(0.15, rel=0.25)
    assert o["correlation"] > 0.9 and bool(o["skill"])
    eu = out.loc[("dwarf", "eu_fe")]
    assert eu["scatter"] == pytest.approx(eu["spread"], rel=0.05) and eu["correlation"] == 0.0
    assert not eu["skill"]
    # rows: quality_flag == 0 of the right model only
    n_dwarf = int(((stars["quality_flag"] == 0) & ~stars["giantmodel"]).sum())
    assert out.loc[("dwarf", "o_fe"), "n"] == n_dwarf


def test_bad_label_sets_are_refused():
    stars, truth = _tables(50)
    with pytest.raises(ValueError, match="dwarf"):
        validation.truth_recovery(stars, truth, ["o_fe"], skill=SKILL)
    with pytest.raises(KeyError, match="giantmodel"):
        validation.truth_recovery(stars.drop(columns="giantmodel"), truth, {"dwarf": ["o_fe"]},
                                  skill=SKILL)
