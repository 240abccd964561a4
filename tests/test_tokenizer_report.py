"""The tokenizer report, checked against values computed by hand on tiny codes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grid.sids import assign_sids
from grid.tokenizers.base import Tokenizer
from grid.tokenizers.report import (
    collision_groups,
    format_comparison,
    format_report,
    gini,
    plot_tokenizers,
    sorted_usage,
    tokenizer_report,
)

CODES = np.array([[0, 0], [0, 0], [1, 1], [1, 2], [2, 2]])


class Stub(Tokenizer):
    """Hand-made codes; reconstructs `scale * X` for the embeddings it was given."""

    def __init__(self, X: np.ndarray, scale: float = 1.0):
        self.X, self.scale, self.dim_ = X, scale, X.shape[1]

    vocab_sizes = (4, 4)

    def fit(self, X):
        return self

    def encode(self, X):
        return CODES

    def reconstruct(self, codes):
        return self.scale * self.X


@pytest.fixture
def X() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)


def test_report_matches_hand_computed_values(X):
    tok = Stub(X)
    sids = assign_sids(CODES, tok.vocab_sizes, "dedup")
    r = tokenizer_report(tok, X, CODES, sids, 1.5, 0.25)
    assert r["collision_rate"] == pytest.approx(2 / 5)  # items 0 and 1 share (0, 0)
    assert r["independent_coding_rate"] == pytest.approx(3 / 5)
    assert r["max_collision_group"] == 2
    assert r["utilization"] == pytest.approx([3 / 4, 3 / 4])
    # level 0 uses codes 0, 1, 2 with counts 2, 2, 1; level 1 codes 0, 1, 2 with counts 2, 1, 2
    h = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert r["perplexity"] == pytest.approx([math.exp(h), math.exp(h)])
    # raw SID sizes 2, 1, 1, 1: sum_i (2i - n - 1) x_(i) / (n sum x) = (-3 - 1 + 1 + 6) / 20
    assert r["gini"] == pytest.approx(0.15)
    assert r["feature_fidelity"] == pytest.approx(1.0)
    assert r["relative_reconstruction_error"] == pytest.approx(0.0, abs=1e-6)
    assert r["sid_length"] == 3 and r["bits_per_item"] == pytest.approx(2 + 2 + 1)
    assert r["collision_strategy"] == "dedup" and r["unique_sid_rate"] == 1.0
    assert r["num_items"] == 5 and r["fit_seconds"] == 1.5 and r["encode_seconds"] == 0.25
    json.dumps(r)


def test_report_random_strategy_and_scaled_reconstruction(X):
    tok = Stub(X, scale=2.0)
    sids = assign_sids(CODES, tok.vocab_sizes, "random")
    r = tokenizer_report(tok, X, CODES, sids, 0.0, 0.0)
    assert r["collision_strategy"] == "random" and r["sid_length"] == 2
    assert r["bits_per_item"] == pytest.approx(4.0)
    assert r["unique_sid_rate"] == pytest.approx(4 / 5)
    assert r["feature_fidelity"] == pytest.approx(1.0)  # same direction, twice the length
    assert r["relative_reconstruction_error"] == pytest.approx(1.0)


def test_gini_extremes():
    assert gini(np.array([3, 3, 3])) == 0.0
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)


def test_formatting_lists_every_metric(X):
    tok = Stub(X)
    r = tokenizer_report(tok, X, CODES, assign_sids(CODES, (4, 4), "dedup"), 0.1, 0.2)
    table = format_report(r)
    for key in ("collision_rate", "utilization", "perplexity", "gini", "bits_per_item"):
        assert key in table
    side = format_comparison({"first": r, "second": {**r, "gini": 0.5}})
    assert "first" in side.splitlines()[0] and "second" in side.splitlines()[0]
    assert "0.5" in next(line for line in side.splitlines() if line.startswith("gini"))


def test_usage_and_collision_groups_by_hand():
    # level 0: codes 0, 1, 2 hold 2, 2, 1 items; level 1: codes 0, 1, 2 hold 2, 1, 2
    usage = sorted_usage(CODES, (4, 4))
    assert [u.tolist() for u in usage] == [[2, 2, 1, 0], [2, 2, 1, 0]]
    # code tuples (0,0) x2, (1,1), (1,2), (2,2): 3 items alone, 2 in a group of 2
    assert collision_groups(CODES, 3).tolist() == [3, 2, 0]
    sizes = np.array([[0]] * 5 + [[1]] * 3 + [[2]] + [[3]] * 2)  # groups of 5, 3, 1, 2
    assert collision_groups(sizes, 4).tolist() == [1, 2, 3, 5]  # bins 1, 2, 3-4, 5-8


def test_plot_has_one_column_per_tokenizer(X, tmp_path):
    import matplotlib.image

    r = tokenizer_report(Stub(X), X, CODES, assign_sids(CODES, (4, 4), "dedup"), 0.1, 0.2)
    many = np.random.default_rng(0).integers(0, 4, size=(200, 12))  # 12 subspaces: a band
    wide = {**r, "tokenizer": "opq", "ordered": False, "vocab_sizes": [4] * 12}
    wide["max_collision_group"] = int(np.unique(many, axis=0, return_counts=True)[1].max())
    plot_tokenizers(tmp_path / "one.png", {"stub": (r, CODES)})
    plot_tokenizers(tmp_path / "two.png", {"stub": (r, CODES), "opq": (wide, many)})
    one, two = (matplotlib.image.imread(tmp_path / f"{n}.png") for n in ("one", "two"))
    assert one.shape[:2] == (750, 500) and two.shape[:2] == (750, 1000)
    assert one[..., :3].std() > 0.05  # drawn on, not blank
