"""Load, merge, override and validate the YAML configs into typed dataclasses.

Order (later wins, deep merge): configs/defaults.yaml, configs/cluster/<profile>.yaml,
configs/stages/*.yaml, configs/experiments/<name>.yaml (after the experiment it
`extends:`, if any), then `key.sub=value` overrides.
Every file is checked against the schema before it is merged, so an unknown key is
reported with the file it came from. Nothing runs on an invalid config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from pipeline import run_folder, schema
from pipeline.schema import Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STAGE_FILES = ("stage1_transformer.yaml", "stage2_vae.yaml", "stage3_vae_gan.yaml")


class ConfigError(ValueError):
    """A config problem, with the key and where it came from."""


EXTENDS = "extends"   # an experiment file's parent experiment, merged before it


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with the same key twice (YAML itself
    keeps the last one silently, so a pasted duplicate would hide the first value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{node.start_mark.name}, line {key_node.start_mark.line + 1}:"
                                  f" key '{key}' appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# --- value constraints (types come from the dataclasses) ---------------------------
CHOICES = {
    "data.tail": {"drop", "pad"},
    "data.channels": {1, 2},
    "data.dtype": {"float32", "int16"},
    "encode.codec": {"encodec", "mel"},
    "encode.device": {"auto", "cpu", "cuda"},
    "cluster.executor": {"auto", "local", "slurm"},
    "stage*.mode": {"continuation", "creative"},
    "stage*.gan.loss": {"bce", "hinge", "lsgan"},
    "stage*.gan.feature_matching_mode": {"paired", "batch"},
    "pairs.target": {"next", "same"},
    "stage*.curriculum.noise": {"sample_std", "data"},
    "stage*.gate.on_fail": {"stop", "warn"},
}
POSITIVE = {
    "data.sample_rate", "data.chunk_seconds", "data.block_seconds", "data.num_shards",
    "data.workers", "pairs.stride", "encode.batch_size", "encode.shard_size",
    "encode.bandwidth", "stage*.epochs", "stage*.batch_size", "stage*.lr",
    "stage*.checkpoint_every", "model.transformer.d_model", "model.transformer.layers",
    "model.transformer.heads", "audit.batch_size", "generate.n", "generate.temperature",
    "stage*.baselines.min_period_s", "stage*.baselines.bar_s",
}
NON_NEGATIVE = {
    "data.min_seconds", "data.max_chunks_per_song", "pairs.gap", "encode.augment.variants",
    "stage*.weight_decay", "stage*.grad_clip", "stage*.augment_prob",
    "stage*.curriculum.rate", "stage*.curriculum.start_epoch", "cluster.max_requeues",
    "stage*.gan.moment_matching", "stage*.gan.r1_gamma", "mlflow.busy_patience_s",
}
FRACTIONS = {"pairs.val_fraction", "data.max_failed_share", "stage*.augment_prob", "stage*.curriculum.cap",
             "stage*.gan.label_smoothing"}


def load(experiment: Optional[str] = None, cluster: str = "local",
         overrides: Iterable[str] = (), config_dir: Path = CONFIG_DIR) -> Config:
    """Build the resolved Config for an experiment, cluster profile and overrides."""
    files = [config_dir / "defaults.yaml", config_dir / "cluster" / f"{cluster}.yaml"]
    files += [config_dir / "stages" / name for name in STAGE_FILES]
    files += experiment_chain(experiment, config_dir) if experiment else []
    merged: dict = {}
    for path in files:
        data = read_yaml(path)
        data.pop(EXTENDS, None)
        check_keys(data, Config, "", str(path))
        merged = deep_merge(merged, data)
    for item in overrides:
        key, value = parse_override(item)
        nested = _nest(key, value)
        check_keys(nested, Config, "", f"command-line override '{item}'")
        merged = deep_merge(merged, nested)
    return build(merged)


def experiment_path(experiment: str, config_dir: Path = CONFIG_DIR) -> Path:
    """A path to a YAML file as given, else configs/experiments/<name>.yaml."""
    exp = Path(experiment)
    return exp if exp.suffix in (".yaml", ".yml") else config_dir / "experiments" / f"{experiment}.yaml"


def read_yaml(path: Path) -> dict:
    """One config file as a mapping; a missing file or another top level is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as stream:   # the file's name goes into errors
        data = yaml.load(stream, Loader=UniqueKeyLoader) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def experiment_chain(experiment: str, config_dir: Path = CONFIG_DIR) -> list[Path]:
    """The experiment file after the ones it `extends` (base first), e.g. musigan -> demo."""
    chain: list[Path] = []
    path: Optional[Path] = experiment_path(experiment, config_dir)
    while path is not None:
        if path in chain:
            raise ConfigError(f"{path}: '{EXTENDS}' loops back to itself via "
                              f"{' -> '.join(str(p) for p in chain)}")
        chain.append(path)
        parent = read_yaml(path).get(EXTENDS)
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(f"{path}: '{EXTENDS}' must name one experiment, got {parent!r}")
        path = experiment_path(parent, config_dir) if parent else None
    return chain[::-1]


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is read as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return key, value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def deep_merge(base: dict, update: dict) -> dict:
    """Return a new dict: `update` merged into `base`, recursively; inputs untouched."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls, vars(schema))


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def check_keys(data: dict, cls: type, prefix: str, source: str) -> None:
    """Raise on any key in `data` that the schema for `cls` does not define."""
    hints = _hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            valid = [f"{prefix}{k}" for k in hints]
            close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
            hint = f"; closest valid keys: {', '.join(close)}" if close else \
                f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown key '{dotted}' in {source}{hint}")
        tp, _ = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            check_keys(value, tp, f"{dotted}.", source)
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            vtype = typing.get_args(tp)[1] if typing.get_args(tp) else None
            if dataclasses.is_dataclass(vtype):
                for name, sub in value.items():
                    if isinstance(sub, dict):
                        check_keys(sub, vtype, f"{dotted}.{name}.", source)


def build(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Turn a merged dict into dataclasses, checking presence, types and ranges."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"missing key '{dotted}': set it in configs/defaults.yaml "
                              "or the stage file")
        kwargs[f.name] = _convert(data[f.name], hints[f.name], dotted)
    obj = cls(**kwargs)
    if cls is Config:
        validate(obj)
    return obj


def _convert(value: Any, tp: Any, dotted: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"'{dotted}' must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{dotted}' must be a mapping, got {type(value).__name__} {value!r}")
        return build(value, tp, f"{dotted}.")
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{dotted}' must be a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[1]):
            return {k: _convert(v, args[1], f"{dotted}.{k}") for k, v in value.items()}
        return copy.deepcopy(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{dotted}' must be a list, got {type(value).__name__} {value!r}")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{dotted}' must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{dotted}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{dotted}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{dotted}' must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _lookup(cfg: Config, dotted: str) -> list[tuple[str, Any]]:
    """Values at a dotted path; `stage*` expands to the three stages; missing parts skipped."""
    heads = ["stage1", "stage2", "stage3"] if dotted.startswith("stage*") else [None]
    found = []
    for head in heads:
        path = dotted.replace("stage*", head) if head else dotted
        obj: Any = cfg
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            found.append((path, obj))
    return found


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        for path, value in _lookup(cfg, key):
            if value not in allowed:
                raise ConfigError(f"'{path}' = {value!r} is not one of {sorted(allowed, key=str)}")
    for key in POSITIVE:
        for path, value in _lookup(cfg, key):
            if value <= 0:
                raise ConfigError(f"'{path}' = {value!r} is out of range: must be > 0")
    for key in NON_NEGATIVE:
        for path, value in _lookup(cfg, key):
            if value < 0:
                raise ConfigError(f"'{path}' = {value!r} is out of range: must be >= 0")
    for key in FRACTIONS:
        for path, value in _lookup(cfg, key):
            if not 0 <= value <= 1:
                raise ConfigError(f"'{path}' = {value!r} is out of range: must be in [0, 1]")
    if cfg.pairs.target == "same" and (cfg.pairs.shuffle_targets or cfg.pairs.gap):
        raise ConfigError("'pairs.target' = 'same' (reconstruction) cannot go with "
                          "'pairs.shuffle_targets' = true or a 'pairs.gap' other than 0")
    tr = cfg.model.transformer
    if tr.d_model % tr.heads:
        raise ConfigError(f"'model.transformer.d_model' = {tr.d_model} must be divisible by "
                          f"'model.transformer.heads' = {tr.heads}")
    for name in ("stage1", "stage2", "stage3"):
        parts = set(getattr(cfg, name).enabled_parts)
        unknown = parts - {"transformer", "vae", "gan"}
        if unknown:
            raise ConfigError(f"'{name}.enabled_parts' has unknown parts {sorted(unknown)}")
        if "vae" in parts and getattr(cfg, name).kl is None:
            raise ConfigError(f"'{name}.kl' must be set when the VAE is enabled")
        if "gan" in parts and getattr(cfg, name).gan is None:
            raise ConfigError(f"'{name}.gan' must be set when the GAN is enabled")


def to_dict(obj: Any) -> dict:
    """Plain nested dict of a config (or any section of it)."""
    return dataclasses.asdict(obj)


def write_resolved(cfg: Config, folder: Path) -> Path:
    """Write the fully resolved config as YAML into a step's output folder (atomically)."""
    from pipeline.atomic import atomic_write_text
    path = run_folder.config_file(folder)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a resolved dict (as written by write_resolved)."""
    return build(data)


def load_resolved(run_dir: Path) -> Config:
    """The config a run was submitted with (run_dir/config.resolved.yaml): every job reads
    this one file, so all steps of a run agree."""
    path = run_folder.config_file(run_dir)
    if not path.is_file():
        raise ConfigError(f"no resolved config at {path}: a run folder holds the config it "
                          "was submitted with (written by pipeline.run)")
    try:
        return from_dict(yaml.safe_load(path.read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_run(run: str | None) -> tuple[Config, Path]:
    """Config and folder of a run: run_dir/config.resolved.yaml (default run: runs/<run.name>)."""
    if run is None:
        base = load()
        run = str(Path(base.run.root) / base.run.name)
    run_dir = Path(run)
    path = run_folder.config_file(run_dir)
    if not path.exists():
        runs = sorted(str(p.parent) for p in run_dir.parent.glob(f"*/{run_folder.CONFIG_FILE}"))
        raise SystemExit(f"no resolved config at {path}: pass --run <run folder>"
                         + (f" (run folders here: {', '.join(runs)})" if runs else ""))
    return load_resolved(run_dir), run_dir
