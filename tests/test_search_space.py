"""Search spaces: the constrained box parametrization, starting points and one-line errors."""

import random

import pytest

from pctune import Hyperparameters, PctuneError
from pctune.search.locate import shipped
from pctune.search.space import hparams_from_config, hparams_to_config, load_space, space_from_mapping

BOX = {"default": {"beta": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.0, "high": 0.6},
                   "alpha": {"low": 1e-4, "high": 1.0, "log": True}}}


def _random_point(space, rng):
    coords = {}
    for name, r in space.dimensions().items():
        # the box's corners and edges are where a wrong mapping breaks
        coords[name] = rng.choice([r.low, r.high, rng.uniform(r.low, r.high)])
    return coords


def test_every_point_of_the_box_satisfies_the_constraint_and_the_ranges():
    space = space_from_mapping({**BOX, "pcoder2": {"beta": {"low": 0.3, "high": 0.7},
                                                   "lambda": {"low": 0.1, "high": 0.2}}}, 4, "t.toml")
    rng = random.Random(0)
    for _ in range(2000):
        hp = space.decode(_random_point(space, rng))  # Hyperparameters validates beta + lambda <= 1
        for n, (b, lam, a) in enumerate(hp.triples(), start=1):
            ranges = space.pcoders[n - 1]
            assert b + lam <= 1 + 1e-12
            assert ranges.beta.contains(b) and ranges.alpha.contains(a)
            assert ranges.lambda_.contains(lam)
        assert hp.lambda_[-1] == 0.0  # the top pcoder's lambda is never searched


def test_dimensions_are_a_static_box():
    space = load_space(shipped("search_spaces") / "pvgg16.toml", 5)
    dims = space.dimensions()
    assert set(dims) == {f"pcoder{n}.beta" for n in range(1, 6)} | {f"pcoder{n}.lambda_u" for n in range(1, 5)}
    assert all(r.low == 0.0 and r.high == 1.0 for r in dims.values())
    assert all(a == 0.0 for a in space.decode({k: 0.5 for k in dims}).alpha)


def test_starting_points_round_trip_through_the_sampled_coordinates():
    space = space_from_mapping(BOX, 5, "t.toml")
    hp = Hyperparameters([0.2, 0.4, 0.4, 0.5, 0.6], [0.05, 0.1, 0.1, 0.1, 0.0], 0.01)
    coords, notes = space.encode(hp)
    assert notes == []
    back = space.decode(coords)
    for a, b in zip(back.triples(), hp.triples(), strict=True):
        assert a == pytest.approx(b, abs=1e-12)


def test_fixed_fields_of_a_starting_point_are_replaced_with_a_note():
    space = load_space(shipped("search_spaces") / "pvgg16.toml", 5)
    coords, notes = space.encode(Hyperparameters.shared(0.8, 0.1, 0.01), label="starting point 'default'")
    assert space.decode(coords).alpha == (0.0,) * 5
    assert any("alpha 0.01 replaced by the fixed 0" in n for n in notes)


def test_a_starting_point_outside_the_range_names_pcoder_and_field():
    space = space_from_mapping({**BOX, "pcoder3": {"beta": {"low": 0.5, "high": 0.9}}}, 4, "s.toml")
    with pytest.raises(PctuneError, match=r"^s.toml: starting point 'x': pcoder3: beta = 0.2 is outside"):
        space.encode(Hyperparameters.shared(0.2, 0.1, 0.01), label="starting point 'x'")


def test_shared_space_samples_one_triple():
    space = space_from_mapping({**BOX, "shared": True}, 3, "t.toml")
    assert set(space.dimensions()) == {"shared.beta", "shared.lambda_u", "shared.alpha"}
    hp = space.decode({"shared.beta": 0.5, "shared.lambda_u": 0.5, "shared.alpha": 0.1})
    assert len(set(hp.triples())) == 1
    with pytest.raises(PctuneError, match="pcoder2: the space shares one triple"):
        space.encode(Hyperparameters([0.2, 0.4, 0.4], [0.1, 0.1, 0.0], 0.01))


def test_config_keys_round_trip():
    hp = Hyperparameters([0.2, 0.4], [0.05, 0.0], [0.01, 0.02])
    config = hparams_to_config(hp)
    assert set(config) == {"pcoder1.beta", "pcoder1.lambda", "pcoder1.alpha", "pcoder2.beta", "pcoder2.lambda",
                           "pcoder2.alpha"}
    assert hparams_from_config(config, 2) == hp


def test_per_pcoder_subspace_fixes_the_others():
    space = space_from_mapping(BOX, 3, "t.toml")
    sub = space.only(2, Hyperparameters.shared(0.8, 0.1, 0.01))
    assert set(sub.dimensions()) == {"pcoder2.beta", "pcoder2.lambda_u", "pcoder2.alpha"}
    hp = sub.decode({"pcoder2.beta": 0.3, "pcoder2.lambda_u": 1.0, "pcoder2.alpha": 0.2})
    assert hp.triples()[0] == (0.8, 0.1, 0.01) and hp.triples()[1][:2] == pytest.approx((0.3, 0.6))


@pytest.mark.parametrize("name", ["demo", "pvgg16", "peffnetb0"])
def test_shipped_spaces_load(name):
    counts = {"demo": 3, "pvgg16": 5, "peffnetb0": 8}
    space = load_space(shipped("search_spaces") / f"{name}.toml", counts[name])
    assert space.dimensions()


@pytest.mark.parametrize(("data", "message"), [
    ({"default": {"beta": {"low": 0.0, "high": 1.5}}}, r"^bad.toml: default: beta: high = 1.5 is outside \[0, 1\]$"),
    ({"pcoder2": {"lambda": {"low": 0.6, "high": 0.2}}}, r"^bad.toml: pcoder2: lambda: low = 0.6 > high = 0.2$"),
    ({"pcoder9": {"beta": 0.5}}, r"^bad.toml: pcoder9: unknown pcoder \(the model has 3 pcoders\)$"),
    ({"num_pcoders": 5}, r"^bad.toml: num_pcoders = 5 but the model has 3 pcoders$"),
    ({"pcoder1": {"alpha": {"low": 0.0, "high": 1.0, "log": True}}}, r"pcoder1: alpha: a log-scaled range needs low > 0"),
    ({"pcoder1": {"beta": -0.1}}, r"^bad.toml: pcoder1: beta: -0.1 is outside \[0, 1\]$"),
    ({"pcoder1": {"gamma": 0.1}}, r"^bad.toml: pcoder1: unknown field 'gamma'"),
    ({"pcoder1": {"beta": {"low": 0.5, "high": 1.0}, "lambda": {"low": 0.2, "high": 0.5}}},
     r"^bad.toml: pcoder1: beta.high \+ lambda.low = 1.2 > 1"),
    ({"colour": 1}, r"^bad.toml: unknown key 'colour'"),
])
def test_bad_spaces_give_one_line_errors(data, message):
    with pytest.raises(PctuneError, match=message) as info:
        space_from_mapping(data, 3, "bad.toml")
    assert "\n" not in str(info.value)
