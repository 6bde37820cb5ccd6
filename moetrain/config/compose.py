"""The config groups composed without Hydra: the same :class:`~moetrain.config.TrainConfig` that
``moetrain-train`` builds from ``configs/train.yaml`` and its overrides, for machines that lack hydra-core and
omegaconf (the GPU check's machine: ``scripts/gpu_check.sh``, the benchmarks).

It follows Hydra's order for the subset of the grammar the configs use: the dataclass defaults, then each group
of ``train.yaml``'s defaults list at its package (``model: tiny`` fills ``model.*``; a file headed
``# @package _global_``, as ``experiment/*.yaml``, fills the root; its ``defaults: [override /moe: X]`` picks
another option of a group the command line left alone), then ``train.yaml``'s own keys, then the
experiment, then the command line's ``key=value`` overrides. ``group=option`` picks another file of a group;
values read as Hydra reads them (``null``, ``true``, ``1e-3``, ``[a,b]``, quoted strings). Interpolations,
``+key``/``~key`` and sweeps are Hydra's alone. ``tests/config/test_validation.py`` checks it against Hydra.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from moetrain.config.errors import ConfigError
from moetrain.config.run import TrainConfig, from_dict, to_dict

_NUMBER = re.compile(r"^[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?$")


def config_dir() -> str:
    """The config groups: the installed ``moetrain.configs`` package data, or, in a source checkout installed in
    editable mode, the repository's ``configs/``."""
    from importlib import resources
    from importlib.util import find_spec

    if find_spec("moetrain.configs") is not None:
        return str(resources.files("moetrain.configs"))
    return str(Path(__file__).resolve().parents[2] / "configs")


def parse_value(text: str) -> Any:
    """A command-line value as Hydra reads it: ``null``, booleans, ints, floats (``1e-3`` too), ``[a, b]`` lists,
    quoted or bare strings."""
    s = text.strip()
    if s in ("null", "~", ""):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [parse_value(v) for v in inner.split(",")] if inner else []
    if any(c.isdigit() for c in s) and _NUMBER.match(s):
        return int(s) if re.fullmatch(r"[-+]?\d[\d_]*", s) else float(s)
    if s.lower() in ("inf", "+inf", "-inf", "nan"):
        return float(s)
    return s


def _read(path: Path) -> tuple[dict[str, Any], bool]:
    """A YAML file's mapping and whether it is ``# @package _global_``."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a mapping of keys")
    return data, "# @package _global_" in text.splitlines()[:3]


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: unknown key ({'.'.join(parents[: i + 1])} is not a section)")
        node = child
    if leaf not in node or isinstance(node[leaf], dict):
        raise ConfigError(f"{dotted}: unknown key (moetrain-train --help lists every key)")
    node[leaf] = value


def _defaults(root: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``train.yaml``'s defaults list as ``(group, option)``, the schema and ``_self_`` left out."""
    out: list[tuple[str, str | None]] = []
    for entry in root.get("defaults", []):
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            out.append((group.removeprefix("optional "), option))
        elif entry not in ("_self_", "train_schema"):
            raise ConfigError(f"configs/train.yaml: defaults entry {entry!r} is not understood without Hydra")
    return out


def _group_overrides(folder: Path, choices: dict[str, str | None], chosen: set[str]) -> None:
    """A group file's own ``defaults: [override /group: option]`` (``model=deepseek_v3`` picks
    ``moe=deepseek_v3_671b``), as Hydra applies them: a group chosen on the command line keeps its choice."""
    for group, option in list(choices.items()):
        path = folder / group / f"{option}.yaml"
        if option is None or not path.is_file():
            continue
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
            ((key, value),) = entry.items() if isinstance(entry, dict) else ((entry, None),)
            target = str(key).removeprefix("override ").strip().lstrip("/")
            if not str(key).startswith("override ") or target not in choices:
                raise ConfigError(f"{path}: defaults entry {entry!r} is not understood without Hydra")
            if target not in chosen:
                choices[target] = value


def _floats(tree: dict[str, Any], cfg: Any) -> None:
    """Ints given for float keys become floats, as Hydra's structured configs convert them."""
    for f in dataclasses.fields(cfg):
        value, default = tree.get(f.name), getattr(cfg, f.name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            _floats(value, default)
        elif isinstance(value, int) and not isinstance(value, bool) and "float" in str(f.type):
            tree[f.name] = float(value)


def compose_without_hydra(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """:class:`TrainConfig` of ``configs/train.yaml`` with ``overrides`` (module docstring), not validated."""
    folder = Path(config_dir())
    root, _ = _read(folder / "train.yaml")
    choices = dict(_defaults(root))
    values: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or key[0] in "+~":
            raise ConfigError(f"{item}: only key=value and group=option overrides work without Hydra")
        if key in choices:
            choices[key] = None if text in ("null", "") else text
        else:
            values.append((key, text))
    _group_overrides(folder, choices, {item.partition("=")[0] for item in overrides} & set(choices))
    tree = to_dict(TrainConfig())
    later: list[dict[str, Any]] = []
    for group, option in choices.items():
        if option is None:
            continue
        path = folder / group / f"{option}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in (folder / group).glob("*.yaml"))
            raise ConfigError(f"{group}={option}: no such option (one of {', '.join(options)})")
        data, is_global = _read(path)
        data.pop("defaults", None)  # its overrides are applied above (_group_overrides)
        if is_global:
            later.append(data)  # after train.yaml's own keys, as Hydra orders an experiment
        else:
            _merge(tree, {group: data})
    own = {k: v for k, v in root.items() if k not in ("defaults", "hydra")}
    for data in (own, *later):
        _merge(tree, data)
    for key, text in values:
        _set(tree, key, parse_value(text))
    _floats(tree, TrainConfig())
    return from_dict(tree)
