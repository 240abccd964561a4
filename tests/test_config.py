import pytest

from grid.config import compose
from grid.errors import GridError


def test_defaults_groups_and_overrides(tmp_path):
    cfg = compose()
    assert cfg.defaults.tokenizer == "rkmeans" and cfg.tokenizer.levels == 3
    cfg = compose(None, ["tokenizer.levels=4", "generator=popularity", "seed=7"])
    assert cfg.tokenizer.levels == 4 and cfg.generator.name == "popularity" and cfg.seed == 7
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults:\n  trainer: gpu\ntokenizer:\n  codebook_size: 64\n")
    cfg = compose(exp, ["tokenizer.codebook_size=32"])
    assert cfg.trainer.max_time is None and cfg.tokenizer.codebook_size == 32  # CLI wins


def test_resolved_config_reruns_identically(tmp_path):
    from grid.config import to_yaml

    cfg = compose(None, ["tokenizer.levels=2", "data=movielens"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert compose(saved) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tokenizer.levls=4"],
            "unknown config key 'tokenizer.levls'.*did you mean 'tokenizer.levels'",
        ),
        (["tokenizer=nope"], "unknown tokenizer 'nope'; available: .*rkmeans"),
        (["tokenizer.levels=many"], "tokenizer.levels must be of type int"),
        (["data.sliding_window=3"], "data.sliding_window must be of type bool"),
        (["tokenizer=rkmeans", "seed"], "not key=value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(GridError, match=message):
        compose(None, overrides)


def test_bad_experiment_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer: [unclosed\n")
    with pytest.raises(GridError, match="invalid YAML"):
        compose(bad)
    bad.write_text("defaults:\n  nonsense: x\n")
    with pytest.raises(GridError, match="unknown config group 'nonsense'"):
        compose(bad)


def test_group_choice_drops_the_experiment_fields_of_that_group(tmp_path):
    assert compose().generator.encoder_layers == 2  # the CPU default experiment's TIGER
    assert compose(None, ["generator=sasrec"]).generator.name == "sasrec"
    assert compose(None, ["generator=tiger"]).generator.encoder_layers == 2  # same choice: kept
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults:\n  tokenizer: rkmeans\ntokenizer:\n  niter: 3\n")
    assert compose(exp, ["tokenizer=opq"]).tokenizer.name == "opq"


def test_trainer_gpu_alone_composes_the_paper_model(tmp_path):
    cfg = compose(None, ["data=sports", "trainer=gpu"])
    gen = cfg.generator
    assert cfg.defaults.data == "sports" and cfg.defaults.trainer == "gpu"
    assert cfg.trainer.max_time is None and cfg.trainer.patience == 10
    assert gen.t5 and gen.mlp_layers == 2 and gen.item_separator
    assert (gen.encoder_layers, gen.decoder_layers, gen.d_model) == (4, 4, 128)
    assert (gen.num_heads, gen.head_dim, gen.d_ff, gen.lr) == (6, 64, 1024, 5e-4)
    assert gen.decoding == "constrained" and gen.beam_width == 20
    assert compose(None, ["trainer=cpu"]).generator.encoder_layers == 2  # the CPU default
    assert compose(None, ["trainer=gpu", "generator.d_model=64"]).generator.d_model == 64
    assert compose(None, ["trainer=gpu", "generator=sasrec"]).generator.name == "sasrec"
    exp = tmp_path / "exp.yaml"  # an experiment file on the command line is never replaced
    exp.write_text("generator:\n  encoder_layers: 3\n")
    assert compose(exp, ["trainer=gpu"]).generator.encoder_layers == 3
