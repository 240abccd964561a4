"""Collaborative encoder: trains on training interactions only, and learns co-occurrence."""

from dataclasses import replace

import numpy as np
import pytest

from grid.data import Dataset, leave_one_out
from grid.encoders import ENCODERS
from grid.encoders.cf import CollaborativeEncoder, interactions, normalized_adjacency

BEAUTY = "data/amazon14_beauty"
# Short runs: enough for a clear signal on a few thousand users in a few seconds.
FAST = {
    "mf": dict(epochs=10, batch_size=4096),
    "lightgcn": dict(epochs=4, batch_size=4096),
    "sasrec": dict(epochs=1, batch_size=256, lr=2e-3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def subset(dataset: Dataset, users: int) -> Dataset:
    return replace(dataset, users=dataset.users[:users], sequences=dataset.sequences[:users])


def poison(dataset: Dataset, seed: int = 1) -> Dataset:
    """Replace every user's validation and test item by a different random item."""
    rng = np.random.default_rng(seed)
    sequences = []
    for s in dataset.sequences:
        s = s.copy()
        for pos in (-2, -1):
            s[pos] = (s[pos] + rng.integers(1, dataset.num_items)) % dataset.num_items
        sequences.append(s)
    return replace(dataset, sequences=sequences)


def test_interaction_matrix_holds_training_pairs_only(beauty):
    split = leave_one_out(beauty.sequences, 20)
    users, items = interactions(split.train, beauty.num_items)
    by_user = np.split(items, np.searchsorted(users, np.arange(1, beauty.num_users)))
    leaked = 0
    for u, row in enumerate(by_user):
        assert set(row.tolist()) == set(split.train[u].tolist())
        held_out = beauty.sequences[u][-2:]
        leaked += sum(i in row and i not in split.train[u] for i in held_out)
    assert leaked == 0
    assert len(users) == len(np.unique(users * beauty.num_items + items))  # distinct pairs

    adj = normalized_adjacency(users, items, beauty.num_users, beauty.num_items)
    assert adj.nnz == 2 * len(users)
    assert abs(adj - adj.T).max() == 0
    assert adj[users[0], beauty.num_users + items[0]] > 0


def test_registered_and_rejects_unknown_method():
    assert ENCODERS["cf"] is CollaborativeEncoder
    with pytest.raises(Exception, match="unknown encoder.method"):
        CollaborativeEncoder("svd")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mf", "lightgcn", "sasrec"])
def test_ignores_validation_and_test_items(beauty, method):
    data = subset(beauty, 800 if method == "sasrec" else 4000)
    clean = leave_one_out(data.sequences, 20)
    bad = poison(data)
    poisoned = leave_one_out(bad.sequences, 20)
    assert all(np.array_equal(a, b) for a, b in zip(clean.train, poisoned.train, strict=True))
    assert not np.array_equal(clean.valid[1], poisoned.valid[1])

    encoder = CollaborativeEncoder(method, dim=32, seed=3, **FAST[method])
    a = encoder.encode(data, clean)
    b = encoder.encode(bad, poisoned)
    assert np.array_equal(a, b)  # also: deterministic for a fixed seed
    c = CollaborativeEncoder(method, dim=32, seed=4, **FAST[method]).encode(data, clean)
    assert not np.array_equal(a, c)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mf", "lightgcn", "sasrec"])
def test_co_occurring_items_are_closer(beauty, method):
    data = subset(beauty, 2000 if method == "sasrec" else 8000)
    split = leave_one_out(data.sequences, 20)
    emb = CollaborativeEncoder(method, dim=32, **FAST[method]).encode(data, split)
    assert emb.shape == (data.num_items, 32) and emb.dtype == np.float32
    assert np.isfinite(emb).all()

    seen = np.bincount(np.concatenate(split.train), minlength=data.num_items) > 0
    norms = np.linalg.norm(emb, axis=1)
    assert (~seen).any() and norms[~seen].max() < 0.05 * np.median(norms[seen])

    # Centred cosine: SASRec's table shares one direction across items (rare items all get
    # pushed down together), which says nothing about co-occurrence.
    x = emb - emb[seen].mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    first = np.concatenate([s[:-1] for s in split.train])
    second = np.concatenate([s[1:] for s in split.train])
    keep = first != second
    first, second = first[keep], second[keep]
    together = (x[first] * x[second]).sum(1).mean()
    rng = np.random.default_rng(0)
    pool = np.flatnonzero(seen)
    a, b = rng.choice(pool, 20000), rng.choice(pool, 20000)
    random = (x[a] * x[b]).sum(1).mean()
    # random partners drawn as often as items occur: co-occurrence beyond shared popularity
    matched = (x[first] * x[rng.permutation(second)]).sum(1).mean()
    assert together > random + 0.1, (together, random)
    assert together > matched + 0.05, (together, matched)
