import gzip
import json
import logging

import numpy as np
import pytest
import torch

from grid.data import (
    LengthBucketSampler,
    SequenceDataModule,
    leave_one_out,
    load_movielens,
    load_sequences,
    training_samples,
)
from grid.errors import GridError

from .conftest import ROOT


def write(folder, sequences: list[str], items: list[dict], gz: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"sequences.tsv{suffix}", "wt") as f:
        f.write("\n".join(sequences) + "\n")
    with opener(folder / f"items.jsonl{suffix}", "wt") as f:
        f.write("\n".join(json.dumps(i) for i in items) + "\n")
    return folder


def test_beauty_matches_published_stats(beauty):
    assert (beauty.num_users, beauty.num_items, beauty.num_interactions) == (22363, 12101, 198502)
    assert beauty.item_ids[0] == "B004756YJA"  # original ASINs kept


def test_leave_one_out_has_no_leakage(beauty, beauty_split):
    histories, targets = beauty_split.test
    for u in range(0, beauty.num_users, 97):
        seq = beauty.sequences[u]
        assert targets[u] == seq[-1] and beauty_split.valid[1][u] == seq[-2]
        assert list(beauty_split.train[u]) == list(seq[:-2])
        assert list(histories[u]) == list(seq[:-1][-20:])
    users, hist, tgt = training_samples(beauty_split.train, 20)
    for u, h, t in zip(users[:5000], hist[:5000], tgt[:5000], strict=True):
        seq = beauty.sequences[u]
        held_out = {seq[-1], seq[-2]} - set(seq[:-2])
        assert t not in held_out and not held_out & set(h)


def test_sliding_window_samples():
    train = [np.array([1, 2, 3, 4]), np.array([7, 8])]
    users, hist, tgt = training_samples(train, max_history=2)
    assert users.tolist() == [0, 0, 0, 1]
    assert [h.tolist() for h in hist] == [[1], [1, 2], [2, 3], [7]]
    assert tgt.tolist() == [2, 3, 4, 8]
    users, hist, tgt = training_samples(train, max_history=20, sliding_window=False)
    assert [h.tolist() for h in hist] == [[1, 2, 3], [7]] and tgt.tolist() == [4, 8]


def test_plain_format_and_short_users(tmp_path, caplog):
    items = [{"item_id": f"i{k}", "title": f"thing {k}"} for k in range(5)]
    folder = write(tmp_path / "d", ["u1\ti0 i1 i2 i3", "u2\ti4 i0", "u3\ti1 i2 i4"], items, gz=True)
    with caplog.at_level(logging.WARNING):
        ds = load_sequences(folder)
    assert ds.users == ["u1", "u3"] and "dropped 1 users" in caplog.text
    assert ds.sequences[1].tolist() == [1, 2, 4]
    write(tmp_path / "e", ["u1\ti0 i1", "u2\ti4"], items)
    with pytest.raises(GridError, match="no user has 3"):
        load_sequences(tmp_path / "e")


@pytest.mark.parametrize(
    ("sequences", "items_text", "message"),
    [
        (["u1\ti0 i1 i2", "u2 i0 i1 i2"], None, r"sequences.tsv:2: expected 'user_id<TAB>"),
        (["u1\ti0 i1 zz"], None, r"sequences.tsv:1: item 'zz'"),
        (["u1\ti0 i1 i2"], '{"item_id": "i0"}\n{"item_id": "i1"\n', r"items.jsonl:2: malformed"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, sequences, items_text, message):
    folder = write(tmp_path, sequences, [{"item_id": f"i{k}"} for k in range(3)])
    if items_text:
        (folder / "items.jsonl").write_text(items_text)
    with pytest.raises(GridError, match=message):
        load_sequences(folder)


def test_missing_file(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"item_id": 1}\n')
    with pytest.raises(GridError, match="missing data file .*sequences.tsv"):
        load_sequences(tmp_path)
    with pytest.raises(GridError, match="does not exist"):
        load_sequences(tmp_path / "nowhere")


def test_movielens_orders_by_time():
    ds = load_movielens(ROOT / "data" / "movielens_100k")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    # cross-check one user against the shipped pre-sorted sequences file
    with gzip.open(ROOT / "data" / "movielens_100k" / "sequences.tsv.gz", "rt") as f:
        user, items = f.readline().rstrip("\n").split("\t")
    index = {i: k for k, i in enumerate(ds.item_ids)}
    assert ds.sequences[ds.users.index(user)].tolist() == [index[i] for i in items.split()]


def test_length_buckets_cover_every_sample_once(beauty_split):
    dm = SequenceDataModule(beauty_split, batch_size=256)
    sampler = LengthBucketSampler(dm.train_set.lengths, 256, shuffle=True, seed=1)
    batches = list(sampler)
    flat = torch.tensor([i for b in batches for i in b])
    assert len(flat) == len(dm.train_set) and len(flat.unique()) == len(flat)
    lengths = dm.train_set.lengths
    padded = sum(len(b) * lengths[b].max().item() for b in batches)
    assert padded < 1.1 * lengths.sum().item()  # bucketing leaves under 10% padding
    batch = next(iter(dm.train_dataloader()))
    assert batch["history"].shape[1] == batch["length"].max()
    assert ((batch["history"] >= 0).sum(1) == batch["length"]).all()


def test_last_items_keeps_the_most_recent():
    from grid.data import last_items

    history = torch.tensor([[1, 2, 3, 4, 5], [6, 7, -1, -1, -1]])
    kept, length = last_items(history, torch.tensor([5, 2]), 3)
    assert kept.tolist() == [[3, 4, 5], [6, 7, -1]] and length.tolist() == [3, 2]
    assert last_items(history, torch.tensor([5, 2]), 5)[0] is history


def _gz_variants(data: bytes) -> dict[str, bytes]:
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8  # damage the deflate stream
    return {
        "truncated": data[: len(data) // 2],  # EOFError
        "corrupt": bytes(corrupt),  # zlib.error or a CRC mismatch
        "not gzip": b"u1\ti0 i1 i2\n",  # gzip.BadGzipFile
    }


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not gzip"])
@pytest.mark.parametrize("stem", ["sequences.tsv", "items.jsonl"])
def test_damaged_gzip_names_the_file(tmp_path, damage, stem):
    items = [{"item_id": f"i{k}", "title": "a rather long title " * 20} for k in range(200)]
    seqs = [f"u{u}\t" + " ".join(f"i{(u * 7 + t) % 200}" for t in range(30)) for u in range(200)]
    folder = write(tmp_path, seqs, items, gz=True)
    path = folder / f"{stem}.gz"
    path.write_bytes(_gz_variants(path.read_bytes())[damage])
    with pytest.raises(GridError, match=rf"^{path} is a truncated or corrupt gzip file .*download"):
        load_sequences(folder)


def test_repeated_user_lines_continue_the_sequence(tmp_path, caplog):
    items = [{"item_id": f"i{k}"} for k in range(6)]
    lines = ["u1\ti0 i1", "u2\ti2 i3 i4", "u1\ti2 i3", "u3\ti5 i4 i3", "u1\ti5"]
    with caplog.at_level(logging.WARNING):
        ds = load_sequences(write(tmp_path, lines, items))
    assert ds.users == ["u1", "u2", "u3"]
    assert ds.sequences[0].tolist() == [0, 1, 2, 3, 5]  # lines 1, 3 and 5, in file order
    assert [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()] == [
        f"{tmp_path / 'sequences.tsv'}: 2 lines repeat an earlier user_id; each continues that "
        "user's sequence (in file order)"
    ]


@pytest.mark.parametrize(("max_history", "sliding_window"), [(5, True), (20, False)])
def test_samples_are_exactly_the_prefixes_before_each_target(beauty, max_history, sliding_window):
    seqs = beauty.sequences
    split = leave_one_out(seqs, max_history)
    dm = SequenceDataModule(
        split, max_history, sliding_window, eval_batch_size=1000, val_users=3000
    )
    # every user's validation history is seq[:-2][-max_history:] (target seq[-2]) and its test
    # history seq[:-1][-max_history:] (target seq[-1]), as the loaders hand them to a model
    loaders = [(dm.full_val_dataloader(), 2), (dm.val_dataloader(), 2), (dm.test_dataloader(), 1)]
    for loader, held_out in loaders:
        users = []
        for batch in loader:
            columns = (batch[k].tolist() for k in ("user", "history", "length", "target"))
            rows = zip(*columns, strict=True)
            for user, history, length, target in rows:
                seq = seqs[user]
                assert history[:length] == seq[:-held_out][-max_history:].tolist()
                assert set(history[length:]) <= {-1} and target == seq[-held_out]
                users.append(user)
        expect = 3000 if loader is loaders[1][0] else len(seqs)
        assert len(users) == len(set(users)) == expect
    # training samples are the windows of seq[:-2] and nothing else: no held-out position leaks
    train = dm.train_set
    by_user: dict[int, list] = {}
    for user, history, length, target in zip(
        train.users.tolist(),
        train.history.tolist(),
        train.lengths.tolist(),
        train.targets.tolist(),
        strict=True,
    ):
        by_user.setdefault(user, []).append((history[:length], target))
    for user, seq in enumerate(seqs):
        ends = range(1, len(seq) - 2) if sliding_window else range(len(seq) - 3, len(seq) - 2)
        expect = [(seq[max(0, t - max_history) : t].tolist(), seq[t]) for t in ends if t >= 1]
        assert by_user.get(user, []) == expect
