import math
import re

import pytest

from pctune import Hyperparameters, PctuneError


def test_per_pcoder_lists_and_shared_triple():
    hp = Hyperparameters([0.2, 0.4], [0.05, 0.1], [0.01, 0.0])
    assert hp.triples() == [(0.2, 0.05, 0.01), (0.4, 0.1, 0.0)]
    assert hp.num_pcoders == 2
    shared = Hyperparameters(0.8, 0.1, 0.01)
    assert shared.num_pcoders is None
    assert shared.for_pcoders(3).triples() == [(0.8, 0.1, 0.01)] * 3


def test_from_mapping_accepts_pcoder_tables_and_predify_names():
    hp = Hyperparameters.from_mapping({
        "pcoder1": {"beta": 0.2, "lambda": 0.05, "alpha": 0.01},
        "pcoder2": {"feedforward": 0.6, "feedback": 0.0, "pc": 0.02},
    })
    assert hp.triples() == [(0.2, 0.05, 0.01), (0.6, 0.0, 0.02)]
    assert Hyperparameters.from_mapping(hp.to_mapping()) == hp


def test_toml_round_trip(tmp_path):
    import tomllib

    hp = Hyperparameters([0.2, 0.4], [0.05, 0.1], 0.01)
    path = tmp_path / "best.toml"
    path.write_text(hp.to_toml())
    assert Hyperparameters.from_mapping(tomllib.loads(path.read_text())) == hp


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=[0.5, 0.8], lambda_=[0.1, 0.3]), "pcoder2: beta + lambda must be <= 1"),
    (dict(beta=[0.5, 0.5], lambda_=[-0.1, 0.1]), "pcoder1: lambda must be >= 0"),
    (dict(beta=[0.5, 0.5], lambda_=[0.1, 0.1], alpha=[0.0, math.nan]), "pcoder2: alpha must be a finite number"),
    (dict(beta=[0.5, 0.5, 0.5], lambda_=[0.1, 0.1]), "one value per pcoder"),
])
def test_invalid_values_name_the_pcoder(kwargs, message):
    with pytest.raises(PctuneError, match=re.escape(message)):
        Hyperparameters(**kwargs)


def test_wrong_pcoder_count_is_rejected():
    hp = Hyperparameters([0.5] * 4, [0.1] * 4)
    with pytest.raises(PctuneError, match="5 pcoders but 4"):
        hp.for_pcoders(5)
    with pytest.raises(PctuneError, match="pcoder3: missing"):
        Hyperparameters.from_mapping({"pcoder1": {"beta": 1, "lambda": 0}, "pcoder2": {"beta": 1, "lambda": 0}}, 3)
    with pytest.raises(PctuneError, match="pcoder6: the model has only 5"):
        Hyperparameters.from_mapping({f"pcoder{i}": {"beta": 1, "lambda": 0} for i in range(1, 7)}, 5)
