"""Prefix tables, constrained/free beam search and the exhaustive oracle on a small Beauty slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, leave_one_out
from grid.errors import GridError
from grid.generators import beam_search
from grid.generators.beam_search import ConstrainedBeamSearch, PrefixTable
from grid.generators.tiger import TIGER
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

SMALL = dict(
    d_model=32, num_heads=2, head_dim=16, d_ff=64, encoder_layers=2, decoder_layers=2, bf16=False
)
# The model variants every decoding test runs on; a new architecture is one more line.
MODELS = [
    pytest.param(dict(architecture="encoder_decoder", user_tokens=7), id="encoder_decoder"),
    pytest.param(dict(architecture="decoder_only", user_tokens=7), id="decoder_only"),
    pytest.param(dict(architecture="encoder_decoder", max_history=12), id="encoder_decoder-trunc"),
    pytest.param(dict(architecture="decoder_only", max_history=12), id="decoder_only-trunc"),
    pytest.param(dict(architecture="encoder_decoder", t5=False, item_separator=True), id="ed-abs"),
    pytest.param(dict(architecture="decoder_only", t5=False, item_separator=True), id="do-abs"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(beauty):
    """The 150 most popular Beauty items (RK-Means 3x8 + dedup) and histories over them."""
    counts = np.bincount(np.concatenate(beauty.sequences), minlength=beauty.num_items)
    keep = np.argsort(-counts, kind="stable")[:150]
    remap = np.full(beauty.num_items, -1)
    remap[keep] = np.arange(len(keep))
    seqs = [remap[s][remap[s] >= 0] for s in beauty.sequences]
    seqs = [s for s in seqs if len(s) >= 3]
    emb = np.random.default_rng(0).standard_normal((len(keep), 32)).astype(np.float32)
    tok = ResidualKMeans(3, 8, niter=5)
    sids = assign_sids(tok.fit_encode(emb), tok.vocab_sizes, "dedup")
    dm = SequenceDataModule(leave_one_out(seqs, 20), batch_size=64, eval_batch_size=32)
    return sids, dm


def _batch(dm, per_length: int = 2) -> dict[str, torch.Tensor]:
    """Validation users of every history length 1-20 (up to `per_length` each), in mixed order."""
    data = dm.full_valid_set
    users = torch.cat([(data.lengths == n).nonzero()[:per_length, 0] for n in range(1, 21)])
    users = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(0))]
    batch = data.collate(users.tolist())
    assert set(batch["length"].tolist()) == set(range(1, 21))  # really mixes lengths
    assert batch["length"][:-1].ne(batch["length"][1:]).sum() > len(users) // 2  # unsorted
    return batch


def test_prefix_table_lookup_and_next(small):
    sids, _ = small
    table = PrefixTable(sids.unique_codes, sids.vocab_sizes)
    codes = torch.as_tensor(sids.unique_codes)
    assert torch.equal(table.lookup(codes), torch.arange(len(codes)))
    bad = codes.clone()
    bad[:, -1] = sids.vocab_sizes[-1] - 1  # the largest dedup digit: only one group has it
    valid = {tuple(c) for c in sids.unique_codes.tolist()}
    expect = torch.tensor([tuple(c) in valid for c in bad.tolist()])
    assert torch.equal(table.lookup(bad) >= 0, expect)
    # level-0 extensions of the root are exactly the first codes in use
    used = np.unique(sids.unique_codes[:, 0])
    root_codes, root_ids = table.extensions(0, torch.zeros(1, dtype=torch.long))
    assert torch.equal(root_codes[0], torch.as_tensor(used))
    assert torch.equal(root_ids[0], torch.arange(len(used)))
    codes, ids = table.extensions(1, torch.tensor([-1]))
    assert (ids == -1).all() and (codes == sids.vocab_sizes[1]).all()


def random_sids(length: int, vocab: int, n: int, seed: int) -> np.ndarray:
    """Distinct sorted code rows, many sharing long prefixes: mutated copies of a few stems."""
    rng = np.random.default_rng(seed)
    stems = rng.integers(0, vocab, size=(4, length))
    rows = stems[rng.integers(0, 4, size=n)]
    cut = rng.integers(1, length + 1, size=n)  # keep the first `cut - 1` codes of the stem
    tail = rng.integers(0, vocab, size=(n, length))
    rows = np.where(np.arange(length) >= cut[:, None] - 1, tail, rows)
    return np.unique(rows, axis=0)


@pytest.mark.parametrize("length,vocab,n", [(2, 3, 7), (4, 256, 3000), (12, 4, 800)])
def test_prefix_table_equals_python_trie(length, vocab, n):
    sids = random_sids(length, vocab, n, seed=length)
    table = PrefixTable(sids, (vocab,) * length)
    prefixes = [sorted({tuple(c[:level]) for c in sids.tolist()}) for level in range(length + 1)]
    ids = [{p: i for i, p in enumerate(level)} for level in prefixes]  # lexicographic numbering
    for level in range(length):
        parents = torch.arange(-1, len(prefixes[level]))  # -1: an invalid prefix
        codes, found = table.extensions(level, parents)
        following = torch.full((len(parents), vocab), -1)  # every code, valid or not
        for c in range(vocab):
            following[:, c] = table.next(level, parents, torch.full_like(parents, c))
        for row, parent in enumerate(parents.tolist()):
            expect = {}
            if parent >= 0:
                p = prefixes[level][parent]
                expect = {
                    c: ids[level + 1][p + (c,)] for c in range(vocab) if p + (c,) in ids[level + 1]
                }
            used = found[row] >= 0
            assert codes[row, used].tolist() == sorted(expect)
            assert found[row, used].tolist() == [expect[c] for c in sorted(expect)]
            assert (codes[row, ~used] == vocab).all()
            assert {c: i for c, i in enumerate(following[row].tolist()) if i >= 0} == expect
    rng = np.random.default_rng(1)
    probe = sids[rng.integers(0, len(sids), 500)].copy()
    flip = rng.random(probe.shape) < 0.5 / length  # invalid extensions of valid prefixes
    probe[flip] = rng.integers(0, vocab, int(flip.sum()))
    group = {tuple(c): i for i, c in enumerate(sids.tolist())}
    expect = [group.get(tuple(c), -1) for c in probe.tolist()]
    assert table.lookup(torch.as_tensor(probe)).tolist() == expect
    assert any(e < 0 for e in expect) and any(e >= 0 for e in expect)
    stored = sum(b.numel() * b.element_size() for b in table.buffers())
    assert stored <= PrefixTable.bytes_needed(len(sids), length)


def test_prefix_table_refuses_a_catalogue_that_would_not_fit(monkeypatch):
    sids = random_sids(4, 256, 3000, seed=0)
    need = PrefixTable.bytes_needed(*sids.shape)
    monkeypatch.setattr(beam_search, "available_memory", lambda: need - 1)
    with pytest.raises(GridError, match=r"needs about 0\.3 MiB .*generator\.decoding=free"):
        PrefixTable(sids, (256,) * 4)
    monkeypatch.setattr(beam_search, "available_memory", lambda: need)
    PrefixTable(sids, (256,) * 4)


def test_prefix_table_refuses_unsorted_codes():
    with pytest.raises(ValueError, match="lexicographic"):
        PrefixTable(np.array([[1, 0], [0, 1]]), (2, 2))


@pytest.mark.parametrize("config", MODELS)
def test_wide_constrained_beam_equals_exhaustive(small, config):
    sids, dm = small
    model = TIGER(sids, beam_width=sids.num_unique, **config, **SMALL).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    model.decoding = "exhaustive"
    best, best_scores = model.search(batch, 20)
    torch.testing.assert_close(scores[:, :20], best_scores, rtol=0, atol=1e-4)
    same = groups[:, :20] == best
    gap = (best_scores[:, 1:] - best_scores[:, :-1]).abs()
    tied = torch.zeros_like(same)
    tied[:, 1:] |= gap < 1e-4
    tied[:, :-1] |= gap < 1e-4
    assert (same | tied).all()
    model.decoding = "constrained"
    items = model.recommend(batch, 10)
    assert ((items >= 0) & (items < sids.num_items)).all()


@pytest.mark.parametrize("config", MODELS)
def test_kv_cache_matches_recomputation(small, config):
    sids, dm = small
    model = TIGER(sids, **config, **SMALL).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    assert (groups >= 0).all()
    codes = torch.as_tensor(sids.unique_codes)[groups]
    reference = model.uncached_logprob(batch, codes)
    torch.testing.assert_close(reference, scores, rtol=0, atol=1e-4)
    # the padded reference itself: each user alone (no padding at all) scores the same
    for row in range(len(codes)):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        alone["history"] = alone["history"][:, : int(batch["length"][row])]
        torch.testing.assert_close(
            model.uncached_logprob(alone, codes[row : row + 1])[0],
            reference[row],
            rtol=0,
            atol=1e-4,
        )


def test_bf16_decoding_close_to_fp32(small):
    sids, dm = small
    model = TIGER(sids, user_tokens=7, **{**SMALL, "bf16": True}).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    codes = torch.as_tensor(sids.unique_codes)[groups]
    torch.testing.assert_close(model.uncached_logprob(batch, codes), scores, rtol=0, atol=0.05)


def test_free_search_keeps_invalid_paths_constrained_does_not():
    # SIDs (0,0) and (1,1); the model prefers code 0 then code 1, which is no SID
    table = PrefixTable(np.array([[0, 0], [1, 1]]), (2, 2))
    prefs = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))

    def step(level, tokens, parents):
        width = 1 if tokens is None else tokens.shape[1]
        return prefs[level].expand(1, width, 2)

    groups, scores = ConstrainedBeamSearch(table, 4, constrained=False).search(step, 1)
    assert groups.tolist() == [[-1, 0, 1, -1]]
    torch.testing.assert_close(scores[0, 0], prefs[0, 0] + prefs[1, 1])
    groups, scores = ConstrainedBeamSearch(table, 4, constrained=True).search(step, 1)
    assert groups.tolist() == [[0, 1, -1, -1]]
    assert torch.isinf(scores[0, 2:]).all()


def plain_beam_search(logp, vocab_sizes, valid_prefixes, width):
    """Textbook beam search over code tuples: extend every beam by every code, keep the best
    `width`; `valid_prefixes` (None: free decoding) restricts the extensions."""
    beams = [((), 0.0)]
    for vocab in vocab_sizes:
        extended = [
            (prefix + (c,), score + float(logp[prefix + (c,)]))
            for prefix, score in beams
            for c in range(vocab)
            if valid_prefixes is None or prefix + (c,) in valid_prefixes
        ]
        beams = sorted(extended, key=lambda beam: -beam[1])[:width]
    return beams


@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("width", [2, 4, 7])
def test_narrow_beam_equals_plain_beam_search(constrained, width):
    vocab_sizes, users = (6, 5, 6), 8
    g = torch.Generator().manual_seed(width)
    combos = np.array(list(np.ndindex(*vocab_sizes)))
    sids = np.unique(combos[torch.randperm(len(combos), generator=g)[:40].numpy()], axis=0)
    table = PrefixTable(sids, vocab_sizes)
    # per user and level, log-probs of the next code given the whole prefix: [B, V0, .., Vl];
    # later levels are sharper, so a greedy early choice is often a bad one and pruning shows
    logps = [
        (torch.randn(users, *vocab_sizes[: level + 1], generator=g) * 3**level).log_softmax(-1)
        for level in range(len(vocab_sizes))
    ]
    prefixes = None

    def step(level, tokens, parents):  # looks up each beam's full prefix, as a model would
        nonlocal prefixes
        if level == 0:
            prefixes = torch.zeros(users, 1, 0, dtype=torch.long)
        else:
            kept = prefixes.gather(1, parents[..., None].expand(-1, -1, level - 1))
            prefixes = torch.cat([kept, tokens[..., None]], dim=2)
        rows = torch.arange(users)[:, None].expand(-1, prefixes.shape[1])
        return logps[level][(rows, *prefixes.unbind(-1))]

    groups, scores = ConstrainedBeamSearch(table, width, constrained).search(step, users)
    valid = {tuple(c[:n]) for c in sids.tolist() for n in range(1, len(vocab_sizes) + 1)}
    group_of = {tuple(c): i for i, c in enumerate(sids.tolist())}
    pruned = False
    for user in range(users):
        logp = {}
        for level, lp in enumerate(logps):
            for prefix in np.ndindex(*vocab_sizes[: level + 1]):
                logp[prefix] = float(lp[(user, *prefix)])
        expect = plain_beam_search(logp, vocab_sizes, valid if constrained else None, width)
        found = scores[user] > float("-inf")
        assert int(found.sum()) == len(expect)
        assert groups[user, found].tolist() == [group_of.get(c, -1) for c, _ in expect]
        torch.testing.assert_close(
            scores[user, found], torch.tensor([s for _, s in expect]), rtol=0, atol=1e-5
        )
        # the beam really pruned: it missed some of the best `width` paths
        paths = sids if constrained else combos
        best = sorted(sum(logp[c[: n + 1]] for n in range(len(c))) for c in map(tuple, paths))
        pruned |= not np.allclose([s for _, s in expect], best[::-1][: len(expect)])
    assert pruned
    assert width < len(sids)


@pytest.mark.parametrize("config", MODELS)
def test_free_decoding_drops_and_counts_invalid(small, config):
    sids, dm = small
    model = TIGER(sids, decoding="free", beam_width=30, **config, **SMALL).eval()
    model._eval_start()
    batch = _batch(dm)
    groups, scores = model.search(batch, 10)
    invalid = int((groups < 0).sum())
    assert invalid > 0  # an untrained model wanders off the valid SIDs
    valid = groups >= 0
    codes = torch.as_tensor(sids.unique_codes)[groups.clamp(min=0)]
    reference = model.uncached_logprob(batch, codes)
    torch.testing.assert_close(reference[valid], scores[valid], rtol=0, atol=1e-4)
    items = model.recommend(batch, 10)
    assert model._invalid == invalid and model._decoded == groups.numel()
    found = valid.sum(1).clamp(max=10)
    for row, n in zip(items, found.tolist(), strict=True):
        assert (row[:n] >= 0).all() and (row[n:] == -1).all()


def test_beam_wider_than_the_sids_is_clipped_with_the_same_result(small, caplog):
    sids, dm = small
    batch = _batch(dm)
    exact = TIGER(sids, beam_width=sids.num_unique, **SMALL).eval()
    with caplog.at_level("WARNING"):
        wide = TIGER(sids, beam_width=sids.num_unique + 50, **SMALL).eval()
    assert f"exceeds the {sids.num_unique} valid SIDs" in caplog.text
    groups, scores = wide.search(batch, 20)
    assert groups.shape[1] == sids.num_unique
    expect = exact.search(batch, 20)
    assert torch.equal(groups, expect[0]) and torch.equal(scores, expect[1])


@pytest.mark.parametrize("t5", [True, False])
def test_long_sids_size_the_positions_and_a_shorter_checkpoint_is_refused(small, t5, tmp_path):
    short, dm = small
    codes = np.random.default_rng(3).integers(0, 4, (short.num_items, 12))
    long = assign_sids(codes, (4,) * 12, "dedup")
    model = TIGER(long, t5=t5, **SMALL).eval()
    groups, _ = model.search(_batch(dm), 20)  # 20 items x 13 tokens of history
    assert (groups >= 0).all()
    path = tmp_path / "short.ckpt"
    torch.save(
        {"state_dict": {}, "grid": TIGER(short, t5=t5, **SMALL).checkpoint_signature()}, path
    )
    with pytest.raises(GridError, match="SID vocabulary sizes") as e:
        model.load_checkpoint(path)
    assert "\n" not in str(e.value)
