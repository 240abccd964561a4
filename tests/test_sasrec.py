"""SASRec: exact top-k over all items, and a short run beats popularity."""

import lightning as L
import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, leave_one_out, pad
from grid.generators import GENERATORS, PipelineInputs
from grid.generators.popularity import Popularity
from grid.generators.sasrec import SASRec
from tests.conftest import QUIET

BEAUTY = "data/amazon14_beauty"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_recommend_is_exact_top_k_of_all_scores(beauty):
    torch.manual_seed(0)
    model = SASRec(beauty.num_items, max_history=8, dropout=0.3).double().eval()
    histories = [s[:-2] for s in beauty.sequences[:64]]  # lengths 1..>8: padding and truncation
    batch = {
        "history": torch.as_tensor(pad(histories)),
        "length": torch.tensor([len(h) for h in histories]),
    }
    assert batch["length"].max() > 8 and batch["length"].min() < 8
    with torch.no_grad():
        top = model.recommend(batch, 10)
        # brute force: each history alone, unpadded, cut to its last max_history items
        states = torch.cat(
            [
                model.user_state(torch.as_tensor(h[-8:])[None], torch.tensor([len(h[-8:])]))
                for h in histories
            ]
        )
        brute = (states @ model.item_embeddings().T).topk(10, dim=1).indices
    assert top.shape == (64, 10)
    assert torch.equal(top, brute)


def test_recommend_pads_when_k_exceeds_catalogue():
    model = SASRec(5, hidden=8).eval()
    batch = {"history": torch.tensor([[0, 1, -1]]), "length": torch.tensor([2])}
    top = model.recommend(batch, 7)
    assert sorted(top[0, :5].tolist()) == list(range(5)) and top[0, 5:].tolist() == [-1, -1]


def test_built_from_config_fields():
    inputs = PipelineInputs(num_items=50, num_users=3, train_sequences=[np.arange(3)])
    model = GENERATORS["sasrec"].build(inputs, hidden=16, blocks=1, heads=2, dropout=0.2)
    assert model.item_embeddings().shape == (50, 16)


@pytest.mark.slow
def test_short_training_beats_popularity(beauty):
    split = leave_one_out(beauty.sequences, 20)
    dm = SequenceDataModule(split, max_history=20, batch_size=256, seed=0, val_users=6000)

    pop = Popularity(beauty.num_items, split.train)
    (pop_metrics,) = L.Trainer(**QUIET).validate(pop, dm.val_dataloader(), verbose=False)

    L.seed_everything(0, verbose=False)
    model = SASRec(beauty.num_items, dropout=0.2, lr=5e-3)  # a fast-learning setting for 200 steps
    trainer = L.Trainer(max_steps=200, **QUIET)
    trainer.fit(model, dm.train_dataloader())
    (metrics,) = trainer.validate(model, dm.val_dataloader(), verbose=False)
    recall, pop_recall = metrics["valid/recall@10"], pop_metrics["valid/recall@10"]
    assert recall > 1.2 * pop_recall, (recall, pop_recall)
    assert metrics["valid/ndcg@10"] > pop_metrics["valid/ndcg@10"]
