"""SETRec: the sparse attention mask, order-agnostic item token sets, beta chosen on validation
only, and a short run on Beauty beats popularity."""

import json
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from grid.cache import StageCache
from grid.cli import main
from grid.data import SequenceDataModule, Split, pad
from grid.encoders.cf import CollaborativeEncoder
from grid.errors import GridError
from grid.generators import GENERATORS, PipelineInputs, layers
from grid.generators.popularity import Popularity
from grid.generators.setrec import BETAS, SETRec, set_attention_mask
from grid.pipeline import Stages, embed_collaborative
from grid.runner import model_key
from tests.conftest import QUIET

from .conftest import beauty_slice

pytestmark = pytest.mark.usefixtures("one_thread")


def random_setrec(items=50, text_dim=12, cf_dim=6, **kwargs) -> SETRec:
    g = np.random.default_rng(0)
    text = g.standard_normal((items, text_dim)).astype(np.float32)
    cf = g.standard_normal((items, cf_dim)).astype(np.float32)
    kwargs = {"semantic_tokens": 3, "hidden": 16, "heads": 2, "ae_hidden": [8], **kwargs}
    return SETRec(text, cf, **kwargs)


@pytest.mark.parametrize(("items", "n", "queries"), [(1, 1, 1), (3, 2, 2), (4, 5, 5), (6, 3, 1)])
def test_attention_mask_has_the_stated_structure(items, n, queries):
    mask = set_attention_mask(items, n, queries)
    S = items * n + queries
    expected = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(S):
            if i == j:
                expected[i, j] = True
            elif i >= items * n:  # a query: every history token, no other query
                expected[i, j] = j < items * n
            else:  # a history token of item i // n: every token of earlier items only
                expected[i, j] = j < items * n and j // n < i // n
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


@pytest.mark.parametrize("architecture", ["decoder_only", "encoder_decoder"])
def test_outputs_ignore_token_order_inside_items(architecture):
    torch.manual_seed(0)
    model = random_setrec(dropout=0.0, architecture=architecture, bf16=False).double().eval()
    B, T, n, d = 6, 7, model.dims, 16
    tokens = torch.randn(B, T, n, d, dtype=torch.float64)
    length = torch.tensor([7, 5, 1, 3, 7, 2])
    # an independent random order of the N + 1 tokens in every item of every history
    order = torch.argsort(torch.rand(B, T, n), dim=2)
    assert (order != torch.arange(n)).any(dim=2).float().mean() > 0.5
    shuffled = tokens.gather(2, order[..., None].expand(B, T, n, d))
    with torch.no_grad():
        out = model.generate(tokens, length)
        assert torch.allclose(model.generate(shuffled, length), out, atol=1e-12)
        # ...while the order of the items themselves matters
        swapped = tokens[:, [1, 0, *range(2, T)]]
        assert not torch.allclose(model.generate(swapped, length)[0], out[0], atol=1e-8)
        # padding changes nothing: the same histories in a wider grid
        wider = torch.cat([tokens, torch.randn(B, 3, n, d, dtype=torch.float64)], dim=1)
        assert torch.allclose(model.generate(wider, length), out, atol=1e-10)


def test_the_t5_forms_encoder_reads_the_history_both_ways():
    """encoder_decoder (the paper's T5 form): a history token's encoding sees later items, so
    the queries' outputs depend on the history as a whole; decoder_only's causal items do not
    let an earlier token see a later one. Both read every item through the queries."""
    torch.manual_seed(0)
    model = random_setrec(dropout=0.0, architecture="encoder_decoder", bf16=False).eval()
    assert not hasattr(model, "blocks") and len(model.history_blocks) == 2
    x = torch.randn(2, 4, model.dims, 16)
    length = torch.tensor([4, 2])
    with torch.no_grad():
        out = model.generate(x, length)
        history = layers.Layout.of(torch.arange(4 * model.dims) < length[:, None] * model.dims)
        first = model.history_blocks[0](history.pack(x.flatten(1, 2)), history)[0]
        changed = x.clone()
        changed[0, 3] += torch.randn(model.dims, 16)  # the last item of the first history
        first_changed = model.history_blocks[0](history.pack(changed.flatten(1, 2)), history)[0]
    assert (first[0] - first_changed[0]).abs().max() > 0  # the first token sees the last item
    assert torch.allclose(model.generate(changed, length)[1], out[1])  # other users unchanged


def test_gradients_repeat_bit_for_bit_on_two_threads():
    """Items repeated across histories add their gradients in a fixed order, so a training step
    (and a resumed run) gives the same weights every time, whatever the threads do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = random_setrec(items=2000, text_dim=32, cf_dim=8, hidden=64, ae_hidden=[64])
        model.eval()  # no dropout: the same forward twice
        g = torch.Generator().manual_seed(0)
        batch = {
            "history": torch.randint(0, 2000, (256, 20), generator=g),
            "length": torch.randint(1, 21, (256,), generator=g),
            "target": torch.randint(0, 2000, (256,), generator=g),
        }

        def grads() -> list[torch.Tensor]:
            model.zero_grad()
            sum(model.loss(batch)).backward()
            return [p.grad.clone() for p in model.parameters()]

        first = grads()
        for _ in range(3):  # thread interleavings differ from one pass to the next
            assert all(torch.equal(a, b) for a, b in zip(first, grads(), strict=True))
    finally:
        torch.set_num_threads(threads)


def test_padded_batch_equals_each_history_alone():
    torch.manual_seed(0)
    model = random_setrec(max_history=4, dropout=0.0).double().eval()
    histories = [np.array(h) for h in ([1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12])]
    batch = {
        "history": torch.as_tensor(pad(histories)),
        "length": torch.tensor([len(h) for h in histories]),
    }
    with torch.no_grad():
        tokens = model.item_tokens()
        out = model.query_outputs(batch, tokens)
        for row, h in enumerate(histories):
            h = torch.as_tensor(h[-4:])  # the most recent max_history items
            alone = model.generate(tokens[h][None], torch.tensor([len(h)]))[0]
            assert torch.allclose(out[row], alone, atol=1e-12)


def test_scores_combine_cf_and_semantic_dimensions():
    torch.manual_seed(0)
    model = random_setrec(bf16=False).eval()
    batch = {"history": torch.tensor([[3, 4, -1], [7, 8, 9]]), "length": torch.tensor([2, 3])}
    cf, semantic = model.dimension_scores(batch)
    with torch.no_grad():
        tokens = model.item_tokens()
        out = model.query_outputs(batch, tokens)
    per_dim = torch.einsum("bnd,ind->bni", out, tokens)
    assert torch.allclose(cf, per_dim[:, 0], atol=1e-5)
    assert torch.allclose(semantic, per_dim[:, 1:].sum(1), atol=1e-5)
    assert torch.allclose(model.scores(batch, 0.3), 0.7 * cf + 0.3 * semantic, atol=1e-5)
    model.beta = 0.0
    assert torch.equal(model.recommend(batch, 5), cf.topk(5).indices)


def test_bad_settings_fail_with_one_line():
    cases = [
        (dict(beta=1.5), "generator.beta=1.5 is out of range; set it to a value in [0, 1]"),
        (dict(beta=-0.1), "generator.beta=-0.1 is out of range"),
        (dict(alpha=-1.0), "generator.alpha=-1.0 is out of range; set it to a value >= 0"),
        (dict(hidden=30, heads=4), "generator.hidden=30 is not divisible by generator.heads=4"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GridError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            random_setrec(**kwargs)
        assert "\n" not in str(e.value)
    inputs = PipelineInputs(50, 3, [np.arange(3)], item_embeddings=np.ones((50, 4), np.float32))
    with pytest.raises(GridError, match="needs collaborative item embeddings"):
        GENERATORS["setrec"].build(inputs, cf_encoder=None)


def test_cf_stage_must_be_collaborative(beauty, beauty_split, tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(GridError, match="generator.cf_encoder is null"):
        embed_collaborative(beauty, beauty_split, None, cache)
    with pytest.raises(GridError, match="minilm is a 'text' encoder, not a collaborative one"):
        embed_collaborative(beauty, beauty_split, "minilm", cache)
    assert not any(tmp_path.iterdir())  # rejected before anything was embedded


def test_cf_stage_enters_the_model_key(beauty, beauty_split):
    cfg = OmegaConf.create(
        {
            "data": {"name": "x", "max_history": 20},
            "generator": {"name": "setrec", "cf_encoder": "cf:sasrec"},
            "trainer": {"max_steps": 5},
            "seed": 0,
        }
    )
    stages = Stages(beauty, beauty_split, np.zeros(1), "text-key")
    keys = {model_key(cfg, replace(stages, cf_embeddings_key=k)) for k in (None, "cf-a", "cf-b")}
    assert len(keys) == 3


# --- training on Beauty ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(beauty, beauty_split, beauty_embeddings, one_thread):
    """SETRec fitted for 150 steps on Beauty, with CF tokens from a quick BPR-MF fit."""
    cf = CollaborativeEncoder("mf", dim=32, epochs=10, batch_size=4096).encode(beauty, beauty_split)
    L.seed_everything(0, verbose=False)
    model = SETRec(
        beauty_embeddings,
        cf,
        semantic_tokens=2,
        hidden=32,
        blocks=1,
        ae_hidden=[128],
        dropout=0.0,
        lr=1e-2,
    )
    dm = SequenceDataModule(beauty_split, max_history=20, batch_size=256, seed=0, val_users=3000)
    L.Trainer(max_steps=150, **QUIET).fit(model, dm.train_dataloader())
    return model, dm


def evaluate(model: SETRec, split: Split, users: int = 2000) -> tuple[dict, dict]:
    """The runner's order on the first `users` users: validation (which chooses beta), then test."""
    model.beta = model.hparams.beta
    valid, test = ((h[:users], t[:users]) for h, t in (split.valid, split.test))
    dm = SequenceDataModule(Split(split.train[:users], valid, test), max_history=20, seed=0)
    trainer = L.Trainer(**QUIET)
    (valid,) = trainer.validate(model, dm.val_dataloader(), verbose=False)
    (test,) = trainer.test(model, dm.test_dataloader(), verbose=False)
    return valid, test


@pytest.mark.slow
def test_short_training_beats_popularity(beauty, trained):
    model, dm = trained
    pop = Popularity(beauty.num_items, dm.split.train)
    (pop_metrics,) = L.Trainer(**QUIET).validate(pop, dm.val_dataloader(), verbose=False)
    (metrics,) = L.Trainer(**QUIET).validate(model, dm.val_dataloader(), verbose=False)
    recall, pop_recall = metrics["valid/recall@10"], pop_metrics["valid/recall@10"]
    print(f"SETRec valid R@10 {recall:.4f} (beta {model.beta}), popularity {pop_recall:.4f}")
    assert recall > 1.3 * pop_recall, (recall, pop_recall)
    assert metrics["valid/ndcg@10"] > pop_metrics["valid/ndcg@10"]
    assert model.beta in BETAS and metrics["setrec/beta"] == pytest.approx(model.beta)


def top1(model: SETRec, histories: list[np.ndarray], beta: float) -> np.ndarray:
    """Each history's best item under `beta`."""
    batch = {
        "history": torch.as_tensor(pad(histories)),
        "length": torch.tensor([len(h) for h in histories]),
    }
    return model.scores(batch, beta).argmax(1).numpy()


@pytest.mark.slow
def test_beta_is_chosen_on_validation_targets_only(trained):
    model, dm = trained
    split = dm.split
    valid, test = evaluate(model, split)
    beta = model.beta
    assert valid["setrec/beta"] == pytest.approx(beta) and "setrec/beta" not in test
    # test targets rigged so that the other end of the grid scores perfectly on them
    other = 1.0 if beta < 0.5 else 0.0
    rigged = (split.test[0], top1(model, split.test[0], other))
    valid2, test2 = evaluate(model, replace(split, test=rigged))
    assert model.beta == beta and valid2 == valid
    assert test2["test/recall@10"] != test["test/recall@10"]  # the test stage read the rig
    # the same rig on the validation targets moves beta
    rigged = (split.valid[0], top1(model, split.valid[0], other))
    valid3, _ = evaluate(model, replace(split, valid=rigged))
    assert model.beta == other and valid3["valid/recall@1"] > 0.5


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_beauty(tmp_path_factory):
    """The first 300 Beauty users and the items they touch, in the plain format."""
    return beauty_slice(tmp_path_factory.mktemp("small_beauty"), 300)


@pytest.mark.slow
def test_run_caches_the_cf_stage_and_writes_beta(small_beauty, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))  # a fresh cache: every stage runs
    args = [
        "data=custom",
        f"data.path={small_beauty}",
        "encoder=cf:mf",  # stands in for text embeddings: no MiniLM encoding in this test
        "encoder.epochs=2",
        "generator=setrec",
        "generator.cf_encoder=cf:lightgcn",
        "generator.hidden=16",
        "generator.semantic_tokens=2",
        "generator.ae_hidden=[32]",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.val_users=null",
        "trainer.logger=none",
        "trainer.progress_bar=false",
    ]
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert round(metrics["setrec/beta"], 6) in BETAS and "test/recall@10" in metrics
    stages = json.loads((out / "stages.json").read_text())
    assert stages["cf_embeddings"] != stages["embeddings"]
    # another CF stage trains another model
    again = tmp_path / "again"
    assert main(["run", *args, "generator.cf_encoder=cf:mf", "--out", str(again)]) == 0
    stages2 = json.loads((again / "stages.json").read_text())
    assert stages2["embeddings"] == stages["embeddings"]
    assert stages2["cf_embeddings"] != stages["cf_embeddings"]
    assert stages2["model"] != stages["model"]
    # a non-collaborative CF stage: one line, non-zero exit, no metrics
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main(["run", *args, "generator.cf_encoder=minilm", "--out", str(bad)]) == 2
    assert not (bad / "metrics.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: generator.cf_encoder=minilm is a 'text' encoder")
