import numpy as np
import pytest

from grid.data import Dataset
from grid.encoders.text import SentenceEmbedder, TextEncoder, item_texts, resolve_model
from grid.errors import GridError

FIELDS = ["title", "brand", "categories", "price", "description"]


def catalogue(items: list[dict]) -> Dataset:
    return Dataset("toy", [str(i["item_id"]) for i in items], items, [], [], "fp")


def test_template_uses_present_fields_then_fallback():
    items = [
        {
            "item_id": 1,
            "title": "Red  lipstick",
            "brand": None,
            "categories": ["Beauty", "Lips"],
            "price": 9.5,
            "description": "",
            "pseudo": "x",
        },
        {"item_id": 2, "title": None, "pseudo": "nail lacquer simmer"},
    ]
    texts = item_texts(catalogue(items), FIELDS, ["pseudo"])
    assert texts[0] == "Title: Red lipstick. Categories: Beauty, Lips. Price: 9.5."
    assert texts[1] == "nail lacquer simmer"


def test_items_without_text():
    items = [{"item_id": k, "title": f"t{k}"} for k in range(200)] + [{"item_id": "bare"}]
    assert item_texts(catalogue(items), ["title"])[-1] == "item bare"  # 1 of 201: a warning
    with pytest.raises(GridError, match="2 of 2 items of toy have none of the text fields"):
        item_texts(catalogue([{"item_id": 1}, {"item_id": 2, "title": " "}]), ["title"])


def test_sentence_transformers_and_plain_hf_paths_agree(beauty):
    """Both loading paths on the bundled MiniLM: its ST pipeline is mean pooling + L2 norm."""
    texts = item_texts(beauty, FIELDS, ["pseudo_text_idgenrec"])[:64]
    st = SentenceEmbedder("all-MiniLM-L6-v2").embed(texts, progress=False)
    hf = SentenceEmbedder("all-MiniLM-L6-v2", pooling="mean").embed(texts, progress=False)
    hf /= np.linalg.norm(hf, axis=1, keepdims=True)
    assert st.shape == (64, 384)
    np.testing.assert_allclose(st, hf, atol=1e-5)


def test_real_embeddings_carry_meaning(beauty, beauty_embeddings):
    texts = item_texts(beauty, FIELDS, ["pseudo_text_idgenrec"])
    polish = [i for i, t in enumerate(texts) if "nail polish" in t][:50]
    other = [i for i, t in enumerate(texts) if "shampoo" in t][:50]
    X = beauty_embeddings
    within = (X[polish] @ X[polish].T).mean()
    across = (X[polish] @ X[other].T).mean()
    assert within > across + 0.1


def test_unknown_model_is_a_clear_error(tmp_path):
    assert resolve_model("all-MiniLM-L6-v2").endswith("model")
    with pytest.raises(GridError, match="cannot load encoder model"):
        TextEncoder(model=str(tmp_path / "missing")).encode(
            catalogue([{"item_id": 1, "title": "a"}])
        )
