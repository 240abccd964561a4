"""`grid recommend` on tiny runs of each generator: audit lists that reproduce the run's own
evaluation, recommendations for users and histories, bad input."""

import json
import math
import shutil

import numpy as np
import pytest

from grid import load_run
from grid.cli import main
from grid.metrics import KS

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = [
    "data=custom",
    "encoder=cf:mf",  # collaborative embeddings: seconds, where MiniLM would encode the text
    "encoder.epochs=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.val_users=null",
    "trainer.logger=none",
    "trainer.progress_bar=false",
]
TIGER = [
    "tokenizer.levels=2",
    "tokenizer.codebook_size=16",
    "tokenizer.collisions=random",  # items share SIDs: the draws among them are per user
    "generator.d_model=16",
    "generator.num_heads=2",
    "generator.head_dim=8",
    "generator.d_ff=32",
    "generator.encoder_layers=1",
    "generator.decoder_layers=1",
]
RUNS = {
    "tiger": TIGER,
    # the same cached model, decoded without constraints: some beams end on no item's SID
    "tiger-free": [*TIGER, "generator.decoding=free", "generator.beam_width=30"],
    "rpg-graph": [
        "generator=rpg",
        "tokenizer=opq",
        "tokenizer.subspaces=4",
        "tokenizer.codebook_size=16",
        "generator.hidden=16",
        "generator.heads=2",
        "generator.d_ff=32",
        "generator.decoding=graph",
        "generator.beam_width=5",
        "generator.n_edges=10",
    ],
    "setrec": [
        "generator=setrec",
        "generator.cf_encoder=cf:mf",
        "generator.hidden=16",
        "generator.semantic_tokens=2",
        "generator.ae_hidden=[32]",
    ],
    "simgr": [
        "generator=simgr",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=16",
        "generator.d_model=16",
        "generator.num_heads=2",
        "generator.head_dim=8",
        "generator.d_ff=32",
        "generator.layers=1",
    ],
    "sasrec": ["generator=sasrec", "generator.hidden=16", "generator.blocks=1"],
    "popularity": ["generator=popularity"],
}


@pytest.fixture(scope="module")
def runs(small_beauty, tmp_path_factory):
    """`runs(name)`: the folder of a finished tiny run of RUNS[name], trained on first use."""
    root = tmp_path_factory.mktemp("runs")
    made = {}

    def get(name: str):
        if name not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("GRID_CACHE", str(root / "cache"))
                args = [*COMMON, f"data.path={small_beauty}", *RUNS[name]]
                assert main(["run", *args, "--out", str(root / name)]) == 0
            made[name] = root / name
        return made[name]

    return get


def read_lists(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_lists_reproduce_the_run_evaluation(runs, name, tmp_path):
    """Recall/NDCG recomputed from the written lists, with nothing but the file, equal the
    run's metrics.json and per_user.npz."""
    folder = runs(name)
    run = load_run(folder, "cpu")  # the cache is found through the run's stages.json
    metrics = json.loads((folder / "metrics.json").read_text())
    for split in ("test", "valid"):
        records = read_lists(run.write_lists(split, tmp_path / f"{split}.jsonl"))
        assert [r["user"] for r in records] == run.dataset.users  # every user once, in order
        ranks = []
        for r in records:
            real = [i for i in r["items"] if i is not None]
            assert len(r["items"]) == len(r["scores"]) <= max(KS)
            assert r["items"][: len(real)] == real  # invalid SIDs only after the items
            assert len(set(real)) == len(real)
            assert np.all(np.diff(r["scores"][: len(real)]) <= 0)  # best first
            ranks.append(r["items"].index(r["target"]) if r["target"] in real else None)
        users = len(records)
        for k in KS:
            hits = [rank for rank in ranks if rank is not None and rank < k]
            # metrics.json holds what Lightning logged: float32
            assert np.float32(len(hits) / users) == np.float32(metrics[f"{split}/recall@{k}"])
            ndcg = sum(1 / math.log2(rank + 2) for rank in hits) / users
            assert ndcg == pytest.approx(metrics[f"{split}/ndcg@{k}"], rel=1e-6, abs=1e-12)
    per_user = np.load(folder / "per_user.npz")
    records = read_lists(tmp_path / "test.jsonl")
    assert per_user["user_id"].tolist() == [r["user"] for r in records]
    assert per_user["warm"].tolist() == [r["warm"] for r in records]
    for k in KS:
        hit = [r["target"] in r["items"][:k] for r in records]
        np.testing.assert_array_equal(per_user[f"recall@{k}"], np.array(hit, dtype=np.float32))
    if name == "setrec":  # the beta the run chose on validation, read back from metrics.json
        assert run.model.beta == pytest.approx(metrics["setrec/beta"])


def assert_equal_up_to_ties(records: list[dict], reference: dict[str, dict]) -> None:
    """Each record's items are its reference list's, but for items whose scores are within
    the scores' noise (other batches round bf16 matmuls differently)."""
    for record in records:
        ref = reference[record["user"]]
        items = [e["item"] for e in record["items"]]
        scores = np.array([e["score"] for e in record["items"]])
        assert len(items) == len(ref["items"])
        ref_scores = np.array(ref["scores"])
        tol = 5e-3 * np.maximum(1, np.abs(ref_scores))
        assert (np.abs(scores - ref_scores) <= tol).all()
        for i, item in enumerate(items):
            if item != ref["items"][i]:
                j = ref["items"].index(item) if item in ref["items"] else len(items) - 1
                assert abs(ref_scores[j] - ref_scores[i]) <= 2 * tol[i], (record["user"], i)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiger", "rpg-graph", "simgr", "setrec"])
def test_users_and_histories_rank_as_the_evaluation_up_to_ties(runs, name, tmp_path):
    run = load_run(runs(name), "cpu")
    reference = {r["user"]: r for r in read_lists(run.write_lists("test", tmp_path / "t.jsonl"))}
    users = run.dataset.users[::5]  # in batches other than the evaluation's
    records = run.recommend_users(users, k=max(KS))
    assert [r["user"] for r in records] == users
    assert [r["target"] for r in records] == [reference[u]["target"] for u in users]
    assert [r["history"] for r in records] == [reference[u]["history"] for u in users]
    assert_equal_up_to_ties(records, reference)
    if name in ("tiger", "rpg-graph"):
        return  # SID draws and graph starts follow the user, which a bare history has not
    histories = run.recommend([r["history"] for r in records], k=max(KS), labels=users)
    assert_equal_up_to_ties(histories, reference)


@pytest.mark.slow
def test_free_decoding_shows_invalid_sids_after_the_items(runs, capsys):
    run = load_run(runs("tiger-free"), "cpu")
    records = run.recommend_users(run.dataset.users[:40], k=30)
    entries = [e for r in records for e in r["items"]]
    invalid = [e for e in entries if e["item"] is None]
    assert invalid and all(e["title"] is None and math.isfinite(e["score"]) for e in invalid)
    for r in records:
        kinds = [e["item"] is None for e in r["items"]]
        assert kinds == sorted(kinds)  # the items first, then the SIDs that are no item's
    user = next(r["user"] for r in records if r["items"][-1]["item"] is None)
    capsys.readouterr()
    assert main(["recommend", str(run.folder), "--user", user, "-k", "30"]) == 0
    assert "(invalid SID)" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_prints_and_writes_json(runs, capsys, tmp_path):
    folder = runs("sasrec")
    run = load_run(folder)
    user = run.dataset.users[3]
    capsys.readouterr()
    assert main(["recommend", str(folder), "--user", user, "-k", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sasrec on custom (3354 items)") and "score: inner product" in out[0]
    rows = [line.split() for line in out if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    expect = run.recommend_users([user], k=5)[0]["items"]
    assert [r[1] for r in rows] == [e["item"] for e in expect]
    # a histories file, labels before a tab, as JSON lines
    file = tmp_path / "histories.txt"
    history = " ".join(run.dataset.item_ids[i] for i in run.split.test[0][3])
    file.write_text(f"first\t{history}\n\n{history}\n")
    assert main(["recommend", str(folder), "--histories", str(file), "--json", "-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["user"] for r in lines] == ["first", None]
    assert lines[0]["items"] == lines[1]["items"]
    assert [e["item"] for e in lines[0]["items"]] == [e["item"] for e in expect[:3]]
    assert lines[0]["history"] == history.split() and lines[0]["target"] is None
    # --next ranks after the whole sequence: the held-out item is part of the history
    assert main(["recommend", str(folder), "--user", user, "--next", "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sequence = [run.dataset.item_ids[i] for i in run.dataset.sequences[3]]
    assert record["history"] == sequence and record["target"] is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--history", "B004756YJA NOT-AN-ITEM"], "unknown item id 'NOT-AN-ITEM' in history 1"),
        (["--history", ""], "history 1 is empty"),
        (["--history", "NOT-AN-ITEM", "--skip-unknown"], "has no item id of the catalogue"),
        (["--history", "B004756YJA", "-k", "99999"], "k=99999 is not between 1 and"),
        (["--user", "NOBODY"], "unknown user 'NOBODY'"),
        ([], "say what to rank for"),
        (["--split", "test", "--user", "X"], "give it without histories, users or -k"),
        (["--user", "X", "--out", "lists.jsonl"], "--out names the file of --split"),
        (["--history", "B004756YJA", "--next"], "give --user ID with it"),
    ],
)
def test_bad_input_is_one_line(runs, capsys, args, message):
    capsys.readouterr()
    assert main(["recommend", str(runs("popularity")), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.slow
def test_unfinished_runs_and_missing_inputs_are_one_line(runs, tmp_path, capsys, monkeypatch):
    def fails(folder, message):
        capsys.readouterr()
        assert main(["recommend", str(folder), "--user", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    fails(tmp_path / "nowhere", "does not exist")
    unfinished = shutil.copytree(runs("tiger"), tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    fails(unfinished, "is not a finished run (no metrics.json)")
    no_model = shutil.copytree(runs("tiger"), tmp_path / "no_model")
    (no_model / "model.ckpt").unlink()
    fails(no_model, "has no model.ckpt, which tiger needs")
    # SETRec reads its text and CF embeddings from the stage cache: gone, it says where to look
    moved = shutil.copytree(runs("setrec"), tmp_path / "moved")
    (moved / "stages.json").unlink()  # the cache the run recorded is unknown, GRID_CACHE empty
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "empty"))
    fails(moved, "set GRID_CACHE to the cache the run used")
