"""Hydra-like config composition on OmegaConf: config groups, experiment files, dotted overrides.

`grid run` without an experiment file composes `experiments/default.yaml` (CPU-sized), or
`experiments/gpu.yaml` (the GRID handbook setting) when the command line picks `trainer=gpu`.
`configs/config.yaml` names a default per group (`defaults: {tokenizer: rkmeans, ...}`); a group
choice `tokenizer=rqvae` loads `configs/tokenizer/rqvae.yaml` (`encoder=cf:lightgcn` loads
`configs/encoder/cf/lightgcn.yaml`); `tokenizer.levels=4` overrides one field. An experiment
YAML may pick groups under `defaults:` and override fields with nested keys. Every override
must name an existing key with a value of the same type, null only where some config of the group
sets that key to null. Numbers follow YAML 1.2: `1e-3` is a float.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from grid.errors import GridError

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("data", "encoder", "tokenizer", "generator", "trainer")
DEFAULT_EXPERIMENT = ROOT / "experiments" / "default.yaml"
MAX_SEED = 2**32 - 1  # numpy and Lightning take seeds in [0, 2^32 - 1]
GPU_EXPERIMENT = ROOT / "experiments" / "gpu.yaml"


def config_dir() -> Path:
    return Path(os.environ.get("GRID_CONFIG_DIR", ROOT / "configs"))


def _root(path: str = "") -> str:
    """`${root:data/x}`: a path inside the grid checkout, wherever the command is run from."""
    return str(ROOT / path)


# OmegaConf 2.4 renamed register_new_resolver; accept both.
_register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
_register("root", _root, replace=True)


class Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: `1e-3` is a float (1.1 reads it as text), `1:30` is text."""


Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float", ":timestamp"))
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """Parse config YAML (files and override values alike) with the YAML 1.2 number rules."""
    return yaml.load(text, Loader=Loader)


def available(group: str) -> list[str]:
    folder = config_dir() / group
    names = [p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")]
    return sorted(n.replace("/", ":") for n in names)


def _load_yaml(path: Path) -> dict:
    try:
        data = read_yaml(path.read_text())
    except OSError as e:
        raise GridError(f"cannot read config {path}: {e.strerror}; check the path")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise GridError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_group(group: str, name: str) -> dict:
    path = config_dir() / group / f"{name.replace(':', '/')}.yaml"
    if not path.is_file():
        raise GridError(
            f"unknown {group} {name!r}; available: {', '.join(available(group))} "
            f"(configs/{group}/*.yaml)"
        )
    return _load_yaml(path)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _type_name(value) -> str:
    return {
        bool: "bool",
        int: "int",
        float: "float",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


def _compatible(old, new) -> bool:
    if old is None or new is None or (isinstance(old, str) and old.startswith("${")):
        return True  # unset, or an interpolation whose type is known only once resolved
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, int | float)
    return isinstance(new, type(old)) or (isinstance(old, int) and isinstance(new, int))


def _nullable() -> set[str]:
    """Keys that may be null: those some config of their group (or config.yaml) sets to null,
    like `trainer.max_time` (no time limit in `trainer=gpu`) or `tokenizer.pca_dim`."""
    keys = {k for k, v in _flatten(_load_yaml(config_dir() / "config.yaml")).items() if v is None}
    for group in GROUPS:
        for name in available(group):
            flat = _flatten(load_group(group, name))
            keys |= {f"{group}.{k}" for k, v in flat.items() if v is None}
    return keys


def _set(tree: dict, dotted: str, value, source: str, nullable: set[str] = frozenset()) -> None:
    """Set an existing key, checking its type; unknown keys get the closest valid one suggested."""
    flat = _flatten(tree)
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(dotted, list(flat), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else "see `grid config show`"
            raise GridError(f"unknown config key {dotted!r} ({source}); {hint}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if value is None and old is not None and dotted not in nullable:
        raise GridError(
            f"{dotted} cannot be null ({source}); give a value like its default {old!r}"
        )
    if isinstance(old, dict) and not isinstance(value, dict):
        raise GridError(f"{dotted} is a section, not a value ({source}); set one of its fields")
    if not isinstance(old, dict) and not _compatible(old, value):
        raise GridError(
            f"{dotted} must be of type {_type_name(old)} (like {old!r}), got {value!r} "
            f"({source}); give a {_type_name(old)} value"
        )
    if isinstance(old, dict):
        for key, sub in _flatten(value).items():
            _set(tree, f"{dotted}.{key}", sub, source, nullable)
    else:
        node[parts[-1]] = float(value) if isinstance(old, float) and value is not None else value


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise GridError(f"override {text!r} is not key=value; e.g. tokenizer=rqvae or seed=1")
    key, _, raw = text.partition("=")
    try:
        value = read_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _unzip(key: str, value, text: str) -> list[tuple[str, object]]:
    """`a,b=[x, y]` sets a=x and b=y (how a wandb sweep passes zipped keys)."""
    if "," not in key:
        return [(key, value)]
    keys = key.split(",")
    if not isinstance(value, list) or len(value) != len(keys):
        raise GridError(f"override {text!r} names {len(keys)} keys; give {len(keys)} values [...]")
    return list(zip(keys, value, strict=True))


def compose(experiment: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """The run config: group defaults, the experiment file (else the default experiment), then
    command-line overrides.

    Without an experiment file, `trainer=gpu` on the command line picks the GPU default
    experiment (the paper model) instead of the CPU-sized one.
    A command-line group choice that replaces the experiment's also drops the experiment's
    fields for that group: they were written for the component it replaced.
    """
    if experiment is None:
        gpu = any(o.partition("=")[::2] == ("trainer", "gpu") for o in overrides)
        default = GPU_EXPERIMENT if gpu else DEFAULT_EXPERIMENT
        experiment = default if default.is_file() else None
    base = _load_yaml(config_dir() / "config.yaml")
    choices = dict(base.pop("defaults"))
    fields: list[tuple[str, object, str]] = []
    if experiment is not None:
        exp = _load_yaml(Path(experiment))
        for group, name in (exp.pop("defaults", None) or {}).items():
            if group not in GROUPS:
                raise GridError(f"{experiment}: unknown config group {group!r}; groups: {GROUPS}")
            choices[group] = name
        fields += [(k, v, str(experiment)) for k, v in _flatten(exp).items()]
    replaced = set()
    for text in overrides:
        for key, value in _unzip(*parse_override(text), text):
            if key in GROUPS:
                if str(value) != str(choices[key]):
                    replaced.add(key)
                choices[key] = str(value)
            else:
                fields.append((key, value, f"override {text!r}"))
    fields = [f for f in fields if not (f[2] == str(experiment) and f[0].split(".")[0] in replaced)]
    tree = {"defaults": choices, **{g: load_group(g, str(choices[g])) for g in GROUPS}, **base}
    nullable = _nullable() if any(value is None for _, value, _ in fields) else set()
    for key, value, source in fields:
        if key.startswith("defaults."):
            raise GridError(f"pick a group with {key.split('.', 1)[1]}=NAME, not {key}")
        _set(tree, key, value, source, nullable)
    cfg = OmegaConf.create(tree)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # interpolation errors name the key already
        raise GridError(f"cannot resolve config: {e}".splitlines()[0])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key, hint = missing[0], "FOLDER" if missing[0].endswith("path") else "VALUE"
        raise GridError(f"{key} is not set (??? in its config); add {key}={hint} to the command")
    _check_max_time(cfg.trainer.get("max_time"))
    check_seed("seed", cfg.seed)
    check_trainer(cfg.trainer)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _check_max_time(max_time) -> None:
    """Lightning parses `trainer.max_time` only once training starts; check its format now."""
    if max_time is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", str(max_time).strip()):
        raise GridError(
            f"trainer.max_time={max_time!r} is not DD:HH:MM:SS; give e.g. "
            f"trainer.max_time=00:01:30:00 (90 minutes), or null for no time limit"
        )


def check_seed(name: str, seed) -> None:
    """Raise GridError unless `seed` is an integer numpy and Lightning accept."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GridError(
            f"{name}={seed!r} is out of range; give an integer in [0, {MAX_SEED}] (2^32 - 1)"
        )


TRAINER_RANGES = {
    "patience": "[0, inf)",
    "batch_size": "[1, inf)",
    "eval_batch_size": "[1, inf)",
    "log_every_n_steps": "[1, inf)",
}


def check_trainer(t: DictConfig) -> None:
    """Raise GridError naming the first trainer field that Lightning or the loaders would reject
    mid-run, or would read as something else (`val_users=0` as all users)."""
    check_fields("trainer", t, TRAINER_RANGES)
    val_users = t.get("val_users")
    if val_users is not None and (not isinstance(val_users, int) or val_users < 1):
        raise GridError(
            f"trainer.val_users={val_users!r} is out of range; set it to 1 or more, or null to "
            f"select the model on every validation user"
        )
    for field in ("max_epochs", "max_steps"):
        value = t.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value != -1 and value < 1:
            raise GridError(
                f"trainer.{field}={value} trains nothing; set it to 1 or more, or -1 for no limit "
                f"(then the other of max_epochs and max_steps bounds training)"
            )
    if t.get("cuda_graphs") and not t.get("compile"):
        raise GridError(
            "trainer.cuda_graphs=true replays the compiled training loss; set trainer.compile=true "
            "too"
        )
    devices = t.get("devices")  # also "auto" or a list of device ids, which Lightning checks
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise GridError(
            f"trainer.devices={devices} is out of range; set it to 1 or more, or -1 for every "
            f"visible device"
        )


_INTERVAL = re.compile(r"([\[(])(.+), (.+)([\])])")


def _describe(interval: str) -> str:
    """`[1, inf)` reads `>= 1`, `(0, inf)` reads `> 0`; a bounded interval stays as written."""
    low_bracket, low, high, _ = _INTERVAL.fullmatch(interval).groups()
    if high == "inf":
        return f"{'>=' if low_bracket == '[' else '>'} {low}"
    return f"in {interval}"


def _inside(value: float, interval: str) -> bool:
    low_bracket, low, high, high_bracket = _INTERVAL.fullmatch(interval).groups()
    above = value >= float(low) if low_bracket == "[" else value > float(low)
    below = value <= float(high) if high_bracket == "]" else value < float(high)
    return above and below


def check_fields(
    section: str, fields: dict, ranges: dict[str, str], choices: dict[str, tuple] | None = None
) -> None:
    """Raise GridError naming the first field outside its choices or its interval (`"[1, inf)"`).

    Fields missing from `fields` or null are skipped; a list is checked element by element.
    """
    for field, allowed in (choices or {}).items():
        if field in fields and fields[field] not in allowed:
            raise GridError(
                f"{section}.{field}={fields[field]!r} is not one of {', '.join(allowed)}; "
                f"pick one of them"
            )
    for field, interval in ranges.items():
        given = fields.get(field)
        for value in given if isinstance(given, list | tuple) else [given]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GridError(
                    f"{section}.{field}={given!r} must be a number {_describe(interval)}"
                )
            if not _inside(value, interval):
                raise GridError(
                    f"{section}.{field}={given!r} is out of range; set it to a value "
                    f"{_describe(interval)}"
                )


def check_divides(section: str, fields: dict, whole: str, part: str) -> None:
    """Raise GridError unless `fields[part]` divides `fields[whole]` (either missing: no check)."""
    if whole in fields and part in fields and fields[whole] % fields[part]:
        raise GridError(
            f"{section}.{whole}={fields[whole]} is not divisible by {section}.{part}="
            f"{fields[part]}; choose {part} that divide {whole}"
        )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
