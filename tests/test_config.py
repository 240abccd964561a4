import inspect

import pytest
from omegaconf import OmegaConf

from grid.config import ROOT, available, compose
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


def test_scientific_notation_is_a_float(tmp_path):
    cfg = compose(None, ["generator.lr=1e-3", "generator.weight_decay=-2E-5"])
    assert cfg.generator.lr == 0.001 and cfg.generator.weight_decay == -2e-5
    exp = tmp_path / "exp.yaml"
    exp.write_text("generator:\n  lr: 1e-3\ntokenizer:\n  codebook_size: 1_024\n")
    cfg = compose(exp)
    assert cfg.generator.lr == 0.001 and cfg.tokenizer.codebook_size == 1024
    # YAML 1.1 would read 01:00:00:00 as the base-60 integer 216000
    assert compose(None, ["trainer.max_time=01:00:00:00"]).trainer.max_time == "01:00:00:00"


def test_null_only_where_a_config_allows_it(tmp_path):
    cfg = compose(None, ["trainer.max_time=null", "trainer.val_users=null"])  # as trainer=gpu
    assert cfg.trainer.max_time is None and cfg.trainer.val_users is None
    assert compose(None, ["tokenizer=opq", "tokenizer.pca_dim=null"]).tokenizer.pca_dim is None
    with pytest.raises(GridError, match="tokenizer.levels cannot be null .*like its default 3"):
        compose(None, ["tokenizer.levels=null"])
    exp = tmp_path / "exp.yaml"
    exp.write_text("generator:\n  max_history: null\n")
    with pytest.raises(GridError, match=r"generator.max_history cannot be null \(.*exp.yaml\)"):
        compose(exp)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_time=soon"], r"trainer.max_time='soon' is not DD:HH:MM:SS; give e.g."),
        (["trainer.max_time=5:00"], r"trainer.max_time='5:00' is not DD:HH:MM:SS"),
        (["data=custom"], r"^data.path is not set .*add data.path=FOLDER"),
    ],
)
def test_values_checked_at_compose_time(overrides, message):
    with pytest.raises(GridError, match=message):
        compose(None, overrides)


def _check(group: str, overrides: list[str], experiment=None) -> None:
    from grid.generators import GENERATORS
    from grid.pipeline import build_tokenizer, params

    cfg = compose(experiment, overrides)
    if group == "tokenizer":
        build_tokenizer(cfg.tokenizer)
    else:
        GENERATORS[cfg.generator.name].check_params(**params(cfg.generator))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tokenizer.levels=0"], r"tokenizer.levels=0 is out of range; set it to a value >= 1"),
        (["tokenizer.codebook_size=-5"], r"tokenizer.codebook_size=-5 is out of range"),
        (["tokenizer=opq", "tokenizer.codebook_size=-5"], r"tokenizer.codebook_size=-5 is out"),
        (["tokenizer=opq", "tokenizer.subspaces=0"], r"tokenizer.subspaces=0 is out of range"),
        (["tokenizer=rvq", "tokenizer.levels=0"], r"tokenizer.levels=0 is out of range"),
        (["tokenizer=rqvae", "tokenizer.hidden=[64,0]"], r"tokenizer.hidden=\[64, 0\] is out of"),
        (["tokenizer=mq", "tokenizer.mask_ratio=1.0"], r"mask_ratio=1.0 .* value in \[0, 1\)"),
        (["tokenizer=mq", "tokenizer.lr=0.0"], r"tokenizer.lr=0.0 is out of range; .* > 0"),
    ],
)
def test_tokenizer_fields_checked_before_fitting(overrides, message):
    with pytest.raises(GridError, match=message):
        _check("tokenizer", overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["generator.beam_width=0"], r"^generator.beam_width=0 is out of range; .* >= 1$"),
        (["generator.max_history=0"], r"^generator.max_history=0 is out of range"),
        (["generator.user_tokens=-1"], r"^generator.user_tokens=-1 is out of range; .* >= 0$"),
        (["generator.dropout=1.5"], r"^generator.dropout=1.5 is out of range; .* in \[0, 1\)$"),
        (["generator.decoding=greedy"], r"^generator.decoding='greedy' is not one of constrained"),
        (["generator=sasrec", "generator.heads=3"], r"generator.hidden=64 is not divisible by"),
        (["generator=sasrec", "generator.blocks=0"], r"^generator.blocks=0 is out of range"),
        (["generator=rpg", "generator.tau=0"], r"^generator.tau=0.0 is out of range; .* > 0$"),
        (["generator=rpg", "generator.decoding=beam"], r"^generator.decoding='beam' is not one"),
        (["generator=setrec", "generator.beta=1.5"], r"^generator.beta=1.5 .* in \[0, 1\]$"),
        (["generator=simgr", "generator.aggregation=max"], r"^generator.aggregation='max' is not"),
    ],
)
def test_generator_fields_name_the_wrong_one(overrides, message):
    with pytest.raises(GridError, match=message):
        _check("generator", overrides)


@pytest.mark.parametrize(
    "experiment",  # sweep files are checked cell by cell in test_sweep.py
    [p for p in sorted((ROOT / "experiments").rglob("*.yaml")) if not p.name.startswith("sweep_")],
)
def test_shipped_experiments_pass_the_checks(experiment):
    for group in ("tokenizer", "generator"):
        _check(group, [], experiment)


@pytest.mark.parametrize("group", ["tokenizer", "generator"])
def test_every_component_config_passes_the_checks(group):
    for name in available(group):
        _check(group, [f"{group}={name}"])


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


@pytest.mark.parametrize("name", ["tiger", "rpg", "simgr"])
def test_generator_config_lists_the_constructor_parameters(name):
    from grid.generators import GENERATORS

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "generator" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    params = inspect.signature(GENERATORS[name].__init__).parameters
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert cfg.keys() == defaults.keys()
    for key, value in cfg.items():  # values that follow other configs (${...}) are left out
        assert str(value).startswith("${") or value == defaults[key], key
