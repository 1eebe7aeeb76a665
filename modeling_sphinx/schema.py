"""Declared schemas for the package's YAML files: mixing recipes (`mixing.recipe.RecipeFile`) and task mixtures
(`training.mixtures.MixtureFile`), and the one reader of those files and of training configs (`read_yaml_file`).

A schema is a strict dataclass (huggingface_hub's `@strict`): each field's annotation says what the key holds and
is checked on construction, and each field made with `ruled` carries its rule, the words of its error, and the check
of its values. `read` turns a YAML mapping into an instance with one error in the package's words: an unknown key
names the closest known one, and a field that fails gives its rule with the value found.
"""

import difflib
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.dataclasses import type_validator, validated_field
from huggingface_hub.errors import StrictDataclassError

Rule = str | Callable[[Any], str]  # a template with `{value}`, or a function of the value


def read_yaml_file(path: str | Path, what: str, error: type[ValueError], shape: str) -> dict:
    """The mapping in the YAML file `path`, or one `error` naming the file: missing, a folder, not text, not YAML
    (with the line), empty or not a mapping. `what` names the file ("recipe file"); `shape` says what it holds."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a folder; give the YAML file")
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; a {what} is YAML") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(problem, "problem", None) or str(problem).splitlines()[0]
        raise error(f"{path}: not valid YAML{where}: {reason}") from None
    if not isinstance(data, dict):
        found = "it is empty" if data is None else f"got {type(data).__name__}"
        raise error(f"{path}: {shape} ({found})")
    return data


def suggest(name: str, known) -> str:
    """` (did you mean 'x'?)` for the closest of `known`, or nothing."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def ruled(rule: Rule, check: Callable[[Any], bool] | None = None, **field_kwargs):
    """A dataclass field whose values must pass `check` as well as their annotated type; `rule` words the error."""

    def validate(value):
        if check is not None and not check(value):
            raise ValueError(say(rule, value))

    return validated_field(validate, metadata={"rule": rule}, **field_kwargs)


def say(rule: Rule, value) -> str:
    return rule(value) if callable(rule) else rule.format(value=value)


def read(schema, mapping: dict, error: type[ValueError], where: str = "", unknown: Rule = "unknown key {value!r}"):
    """An instance of the strict dataclass `schema` from `mapping`, or one `error` saying `where` and what is wrong:
    an unknown key (`unknown`, with the closest known key suggested), or the first field, in declaration order,
    whose value fails its type or its rule."""
    known = [f.name for f in fields(schema)]
    for key in mapping:
        if key not in known:
            raise error(f"{where}{say(unknown, key)}{suggest(str(key), known)}")
    try:
        return schema(**mapping)
    except (StrictDataclassError, TypeError):  # a field failed, or a required one is missing: find which
        pass
    for f in fields(schema):
        if f.name not in mapping and (f.default is not MISSING or f.default_factory is not MISSING):
            continue
        value = mapping.get(f.name)
        try:
            type_validator(f.name, value, f.type)
            for validate in f.metadata.get("validator", []):
                validate(value)
        except (TypeError, ValueError):
            rule = f.metadata.get("rule", f"{f.name} is not valid, got {{value!r}}")
            raise error(f"{where}{say(rule, value)}") from None
    raise error(f"{where}the entries do not make a valid {schema.__name__}")  # a class validator failed
