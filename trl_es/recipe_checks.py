"""Checks for hand-written recipes: values against dataclass field types, and YAML that loses information silently.

Both exist because the recipe paths hand YAML values to the configs untyped. ``TrlParser.set_defaults_with_config``
makes every recipe value an argparse *default*, and argparse converts only string defaults, so ``population_size:
4.0`` arrives as a float and ``reward_funcs: arithmetic_accuracy`` as a string (iterated letter by letter later);
``trl-es compare`` does arithmetic on the raw values. And ``yaml.safe_load`` keeps the last of two equal keys
without a word, and reads ``1e-4`` (no dot) as the string ``'1e-4'`` (YAML 1.1).

Pure Python plus PyYAML: importing this module loads neither torch nor transformers.
"""

import dataclasses
import enum
import numbers
import re
import types
import typing

import yaml


_NONE = type(None)


def _describe(annotation) -> str:
    if annotation is _NONE:
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(annotation))  # drop module paths


def type_problem(value, annotation) -> str | None:
    """Why ``value`` does not fit the field annotation ``annotation`` (``None`` when it fits).

    Strict the way a hand-written recipe needs: an ``int`` field takes integers only (not ``4.0``, not ``True``), a
    ``float`` field takes ints and floats but not bools or text, a ``bool`` field takes ``true``/``false`` only, a
    ``list[...]`` field takes a list (or tuple) whose items fit. Annotations this function does not know (a config
    class, ``Any``) accept anything: the field's own code checks those.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        problems = [type_problem(value, member) for member in members]
        if any(problem is None for problem in problems):
            return None
        specific = [problem for member, problem in zip(members, problems) if member is not _NONE]
        if len(specific) == 1:  # `int | None` and the like: the one real type's message is the helpful one
            return specific[0]
        return f"expected {' or '.join(_describe(m) for m in members)}"
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"expected one of {list(choices)}"
    if origin in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return f"expected a list (write [{value!r}] for one item)"
        item_types = typing.get_args(annotation)
        if item_types and item_types[-1] is not Ellipsis:
            for index, item in enumerate(value):
                problem = type_problem(item, item_types[0])
                if problem is not None:
                    return f"item {index} ({item!r}): {problem}"
        return None
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else "expected a mapping"
    if annotation is typing.Any or not isinstance(annotation, type):
        return None
    if annotation is _NONE:
        return None if value is None else "expected null"
    if annotation is bool:
        return None if isinstance(value, bool) else "expected true or false (unquoted)"
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return None
        if isinstance(value, float) and value.is_integer():
            return f"expected an integer (write {int(value)}, not {value})"
        return "expected an integer"
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return None
        if isinstance(value, str) and _looks_like_float(value):
            return "expected a number, not text (YAML 1.1 reads 1e-4 as a string: write 1.0e-4)"
        return "expected a number"
    if annotation is str:
        return None if isinstance(value, str) else "expected a string"
    if issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        return None if isinstance(value, annotation) or value in values else f"expected one of {values}"
    return None  # a config class or other type the field converts itself


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _field_types(dataclass_type) -> dict:
    try:
        hints = typing.get_type_hints(dataclass_type)
    except Exception:  # an annotation that does not resolve here: fall back to what the class recorded
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(dataclass_type)}


def check_recipe_types(config: dict, dataclass_types) -> list[str]:
    """The recipe entries whose value does not fit the annotation of the field they set, one message each.

    ``config`` is a flat mapping of field name to value (a recipe after its sections are merged); ``dataclass_types``
    the dataclasses it targets (e.g. ``(ESScriptArguments, ESConfig, ModelConfig)``). A key that several dataclasses
    declare must fit one of them. Keys no dataclass declares are left to the parser, which reports unknown keys.
    """
    fields: dict[str, list] = {}
    for dataclass_type in dataclass_types:
        for name, annotation in _field_types(dataclass_type).items():
            fields.setdefault(name, []).append(annotation)
    problems = []
    for key, value in config.items():
        if key not in fields:
            continue
        found = [type_problem(value, annotation) for annotation in fields[key]]
        if all(problem is not None for problem in found):
            problems.append(f"{key}: {found[0]}, got {type(value).__name__} {value!r}")
    return problems


# ---------------------------------------------------------------------------------------------- strict YAML


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-4`` as a float (as YAML 1.2 and the CLI do)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' entries may be overridden by explicit keys: that is what merge means
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first on line {first.line + 1}, again on line "
                        f"{key_node.start_mark.line + 1}); YAML would silently keep only the last value",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 wants a dot in a float ('1.0e-4'); without one, '1e-4' is a string. Resolvers are class-level state:
# add_implicit_resolver copies the table into StrictLoader first, so yaml.SafeLoader itself is untouched.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_strict(path: str):
    """Load a YAML file like ``yaml.safe_load``, but refuse duplicate keys (naming the key, the file and both lines)
    and read exponent floats without a dot (``1e-4``) as floats."""
    with open(path) as file:
        try:
            return yaml.load(file, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
        except DuplicateKeyError as error:
            raise ValueError(f"{path}: {error.problem}") from error
