"""`grid run` end to end on a small Beauty subset: model selection and reproducible evaluation."""

import json

import numpy as np
import pytest

from grid.config import compose
from grid.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def beauty_150(beauty, tmp_path_factory):
    """Beauty's 150 most popular items and the users keeping 3 or more of them, as a data folder."""
    folder = tmp_path_factory.mktemp("beauty_150")
    counts = np.bincount(np.concatenate(beauty.sequences), minlength=beauty.num_items)
    keep = np.argsort(-counts, kind="stable")[:150]
    kept = set(keep.tolist())
    lines = []
    for user, seq in zip(beauty.users, beauty.sequences, strict=True):
        items = [beauty.item_ids[i] for i in seq.tolist() if i in kept]
        if len(items) >= 3:
            lines.append(f"{user}\t{' '.join(items)}\n")
    (folder / "sequences.tsv").write_text("".join(lines))
    (folder / "items.jsonl").write_text("".join(json.dumps(beauty.items[i]) + "\n" for i in keep))
    return folder


def tiny(data, *extra) -> list[str]:
    return [
        "data=custom",
        f"data.path={data}",
        "encoder=cf/mf",  # collaborative embeddings: seconds, where MiniLM would encode the text
        "encoder.epochs=5",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=8",
        "tokenizer.collisions=random",
        "generator.d_model=32",
        "generator.num_heads=2",
        "generator.head_dim=16",
        "generator.d_ff=64",
        "generator.encoder_layers=1",
        "generator.decoder_layers=1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.val_users=null",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.mark.slow
def test_cached_model_scores_as_the_fresh_one(beauty_150, tmp_path, monkeypatch):
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    cfg = compose(None, tiny(beauty_150, "generator.decoding=free", "generator.beam_width=30"))
    fresh = run(cfg, tmp_path / "fresh")  # trains: fit's validations draw colliding items too
    again = run(cfg, tmp_path / "again")  # the cached model, evaluated alone
    report = json.loads((tmp_path / "fresh" / "tokenizer_report.json").read_text())
    assert report["collision_rate"] > 0.5  # most items share their SID: the draws decide hits
    assert fresh["test/recall@20"] > 0.05
    scores = [k for k in fresh if k.startswith(("valid/", "test/"))]
    assert {k: again[k] for k in scores} == {k: fresh[k] for k in scores}

    # how the model was selected, whoever trained it
    selection = json.loads((tmp_path / "fresh" / "selection.json").read_text())
    assert selection == json.loads((tmp_path / "again" / "selection.json").read_text())
    users = sum(1 for _ in (beauty_150 / "sequences.tsv").open())
    assert selection["monitor"] == "valid/ndcg@10" and selection["val_users"] == users
    assert selection["decoding"] == {"decoding": "constrained", "beam_width": 20}
    assert selection["global_step"] in (10, 20) and selection["epoch"] == 0
    # the recorded score is the selected model's score under the selection decoding
    fixed = compose(None, tiny(beauty_150, "generator.decoding=constrained"))
    constrained = run(fixed, tmp_path / "constrained")  # same cached model, inference differs
    assert constrained["valid/ndcg@10"] == pytest.approx(selection["best_score"], rel=1e-6)
