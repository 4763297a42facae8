"""The configuration reference (``docs/configuration.md``), generated from the structured configs.

Keys, types and defaults come from composing each command's config with hydra (so YAML presets
show their own values); descriptions are the comments next to each field in ``schema.py``, read
with ``ast`` and ``tokenize`` from its source. Regenerate with::

    python -m storefed.config.reference > docs/configuration.md

``tests/test_config_reference.py`` fails when the file is stale.
"""

from __future__ import annotations

import ast
import io
import math
import sys
import tokenize
import types
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from storefed.config import schema

REGENERATE = "python -m storefed.config.reference > docs/configuration.md"


@dataclass(frozen=True)
class KeyDoc:
    """One row of a key table: an override key with its type, default and description."""

    key: str  # the dotted override key, e.g. privacy.epsilon
    type: str
    default: str  # as typed on the command line (null, true, [a, b], ??? = required)
    description: str
    owner: str  # the schema.py class whose source declares the field
    field: str

    def row(self) -> str:
        """The Markdown table row."""
        default = "" if self.type == "section" else f"`{self.default}`"
        default = "`???` (required)" if self.default == "???" else default
        return _row(f"`{self.key}`", self.type, default, self.description)


# --- schema.py source: field comments and class docstrings ----------------------------------------
@dataclass(frozen=True)
class _ClassSource:
    docstring: str
    comments: dict[str, str]  # field name -> its comment text ("" when it has none)


@lru_cache(maxsize=1)
def schema_source() -> dict[str, _ClassSource]:
    """Every class in schema.py with its docstring and field comments (see :func:`parse_classes`)."""
    return parse_classes(Path(schema.__file__).read_text(encoding="utf-8"))


def parse_classes(source: str) -> dict[str, _ClassSource]:
    """Every class in Python ``source``: its docstring's first paragraph and each annotated field's comment.

    A field's comment is the run of full-line comments directly above it (no blank line between)
    followed by the comments on the field's own lines."""
    comments: dict[int, str] = {}
    full_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                full_line.add(line)
    classes: dict[str, _ClassSource] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        doc = ast.get_docstring(node) or ""
        field_comments: dict[str, str] = {}
        previous_end = node.lineno
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above: list[str] = []
                line = stmt.lineno - 1
                while line > previous_end and line in full_line:
                    above.insert(0, comments[line])
                    line -= 1
                own = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
                field_comments[stmt.target.id] = _join(above, own)
            previous_end = stmt.end_lineno or stmt.lineno
        classes[node.name] = _ClassSource(" ".join(doc.split("\n\n")[0].split()), field_comments)
    return classes


def _join(above: list[str], own: list[str]) -> str:
    first, second = " ".join(t for t in above if t), " ".join(t for t in own if t)
    if first and second and first[-1] not in ".:;":
        first += "."
    return " ".join(t for t in (first, second) if t)


def field_owner(cls: type, name: str) -> str:
    """The class in ``cls``'s MRO whose schema.py source declares field ``name`` (or ``cls``'s own name)."""
    source = schema_source()
    for klass in cls.__mro__:
        if name in source.get(klass.__name__, _ClassSource("", {})).comments:
            return klass.__name__
    return cls.__name__


def field_description(cls: type, name: str) -> str:
    """The schema.py comment of field ``name`` of dataclass ``cls`` ("" when there is none)."""
    klass = schema_source().get(field_owner(cls, name))
    return klass.comments.get(name, "") if klass else ""


def class_description(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring in schema.py, as Markdown ("" when it has none)."""
    klass = schema_source().get(cls.__name__)
    return klass.docstring.replace("``", "`") if klass else ""


# --- types and values ---------------------------------------------------------------------------
def type_name(tp: Any) -> str:
    """A field annotation as a user reads it: ``int``, ``list[str]``, ``float or null``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if tp is Any:
        return "any"
    if is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """``value`` as it is typed in an override (``null``, ``true``, ``inf``, ``[a, b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and not value:
        return "''"
    return str(value)


def _cell(text: str) -> str:
    """One table cell: on one line, ``|`` escaped, and ``*``, ``<``, ``>`` escaped outside code spans."""
    parts = " ".join(str(text).split()).replace("``", "`").replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


# --- composition ----------------------------------------------------------------------------------
def command_groups(command: str) -> dict[str, str]:
    """The config groups of ``command``'s root config with their default option, from its defaults list."""
    from storefed.config.store import ROOT_CONFIGS

    defaults = next((f.default_factory() for f in fields(ROOT_CONFIGS[command]) if f.name == "defaults"), [])
    return {group: option for entry in defaults if isinstance(entry, dict) for group, option in entry.items()}


@lru_cache(maxsize=1)
def _composed() -> dict[str, Any]:
    """Per command: its group options, its default config, and one config per group option.

    Composed by hydra without range checks (a preset's ``data.path`` need not exist here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from storefed.config.store import ROOT_CONFIGS, register

    register()
    result: dict[str, Any] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="storefed.conf", version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            for command in ROOT_CONFIGS:
                groups = command_groups(command)
                options = {g: [o for o in loader.get_group_options(g) if not o.endswith("_schema")] for g in groups}
                per_option: dict[tuple[str, str], Any] = {}
                for i in range(max((len(o) for o in options.values()), default=0)):
                    choice = {g: opts[i] for g, opts in options.items() if i < len(opts)}
                    cfg = hydra_compose(config_name=command, overrides=[f"{g}={o}" for g, o in choice.items()])
                    per_option.update({(g, o): cfg[g] for g, o in choice.items()})
                result[command] = (options, hydra_compose(config_name=command), per_option)
    finally:
        GlobalHydra.instance().clear()
    return result


def key_docs(node: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> list[KeyDoc]:
    """Every key of a composed config ``node`` (hydra DictConfig), depth first, sections included."""
    from omegaconf import DictConfig, OmegaConf

    cls = OmegaConf.get_type(node)
    hints = get_type_hints(cls)
    container = OmegaConf.to_container(node, resolve=False, throw_on_missing=False)
    present = set(node.keys())  # (`name in node` is False for a missing ??? value)
    rows: list[KeyDoc] = []
    for f in fields(cls):
        if f.name == "defaults" or f.name in skip or f.name not in present:
            continue
        key, child = f"{prefix}{f.name}", node._get_node(f.name)
        owner, description = field_owner(cls, f.name), field_description(cls, f.name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            rows.append(KeyDoc(key, "section", "", description, owner, f.name))
            rows += key_docs(child, f"{key}.")
            continue
        default = "???" if OmegaConf.is_missing(node, f.name) else format_value(container[f.name])
        rows.append(KeyDoc(key, type_name(hints[f.name]), default, description, owner, f.name))
    return rows


def command_key_docs(command: str) -> list[KeyDoc]:
    """The keys of ``command`` outside its config groups (those are in :func:`group_key_docs`)."""
    _, cfg, _ = _composed()[command]
    return key_docs(cfg, skip=tuple(command_groups(command)))


def group_key_docs(command: str, group: str, option: str) -> list[KeyDoc]:
    """The keys of ``group=option`` as composed for ``command`` (dotted from the root: ``task.lr``)."""
    _, _, per_option = _composed()[command]
    return key_docs(per_option[(group, option)], f"{group}.")


def group_options(group: str) -> list[str]:
    """The options of ``group`` (``*_schema`` entries are internal and left out)."""
    for options, _, _ in _composed().values():
        if group in options:
            return options[group]
    return []


def all_key_docs() -> list[KeyDoc]:
    """Every row of every key table in the reference (group rows included)."""
    from storefed.config.store import ROOT_CONFIGS

    rows: list[KeyDoc] = []
    for command in ROOT_CONFIGS:
        rows += _group_rows(command) + command_key_docs(command)
        for group in command_groups(command):
            for option in group_options(group):
                rows += group_key_docs(command, group, option)
    return rows


def _group_rows(command: str) -> list[KeyDoc]:
    from storefed.config.store import ROOT_CONFIGS

    root = ROOT_CONFIGS[command]
    return [KeyDoc(g, "group", o, field_description(root, g), field_owner(root, g), g)
            for g, o in command_groups(command).items()]


def _option_schema(group: str, option: str) -> type:
    from omegaconf import OmegaConf

    command = next(c for c, (options, _, _) in _composed().items() if group in options)
    return OmegaConf.get_type(_composed()[command][2][(group, option)])


def _preset_comment(group: str, option: str) -> str | None:
    """The leading comment of ``conf/<group>/<option>.yaml``, or None when the option is not a preset."""
    path = resources.files("storefed.conf").joinpath(group, f"{option}.yaml")
    if not path.is_file():
        return None
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    return text.removeprefix("Preset:").strip()


# --- rendering ------------------------------------------------------------------------------------
def _preset_changes(command: str, group: str, option: str) -> list[KeyDoc]:
    """The keys whose default the preset ``group=option`` changes from its schema's defaults."""
    from omegaconf import OmegaConf

    schema_rows = {r.key: r for r in key_docs(OmegaConf.structured(_option_schema(group, option)), f"{group}.")}
    return [r for r in group_key_docs(command, group, option) if r != schema_rows.get(r.key)]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _command_title(command: str) -> str:
    return "storefed " + command.replace("_", " ")


def _anchor(group: str, option: str) -> str:
    return f"{group}-{option}"


def _key_table(rows: list[KeyDoc]) -> list[str]:
    return ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"] + [r.row() for r in rows]


def _render_command(command: str) -> list[str]:
    from storefed.config.store import ROOT_CONFIGS

    root = ROOT_CONFIGS[command]
    groups = command_groups(command)
    usage = "[group=option ...] [key=value ...]" if groups else "[key=value ...]"
    title = f"`{_command_title(command)}`"
    lines = [f"### {title}", "", _sentence(class_description(root).removeprefix(f"{title}:").strip()), "",
             f"Usage: `{_command_title(command)} {usage}`", ""]
    if groups:
        lines += [("Config groups (choose with `group=option`; each option's keys are under "
                   "[Config groups](#config-groups)):"), "",
                  "| Group | Default | Options | Description |", "| --- | --- | --- | --- |"]
        for row in _group_rows(command):
            links = ", ".join(f"[`{o}`](#{_anchor(row.key, o)})" for o in group_options(row.key))
            lines.append(_row(f"`{row.key}`", f"`{row.default}`", links, row.description))
        lines.append("")
    lines += ["Keys:" if not groups else "Keys outside the groups:", ""] + _key_table(command_key_docs(command))
    return lines + [""]


def _render_group(group: str) -> list[str]:
    from storefed.config.store import ROOT_CONFIGS

    users = [c for c in ROOT_CONFIGS if group in command_groups(c)]
    defaults = ", ".join(f"`{_command_title(c)}`: `{command_groups(c)[group]}`" for c in users)
    options = ", ".join(f"`{o}`" for o in group_options(group))
    lines = [f"### `{group}`", "", f"Options: {options}. Default per command: {defaults}.", ""]
    for option in group_options(group):
        cls = _option_schema(group, option)
        preset = _preset_comment(group, option)
        if preset is None:
            text = " ".join(t for t in (_sentence(class_description(cls)), f"Schema `{cls.__name__}`.") if t)
        else:
            changed = ", ".join(f"`{r.key}={r.default}`" for r in _preset_changes(users[0], group, option))
            text = " ".join(t for t in (_sentence(preset), f"Preset `conf/{group}/{option}.yaml` over schema "
                                        f"`{cls.__name__}`" + (f"; it sets {changed}." if changed else ".")) if t)
        lines += [f'<a id="{_anchor(group, option)}"></a>', "", f"#### `{group}={option}`", "", text, ""]
        variants: dict[tuple[KeyDoc, ...], list[str]] = {}
        for command in users:
            variants.setdefault(tuple(group_key_docs(command, group, option)), []).append(command)
        for rows, commands in variants.items():
            if len(variants) > 1:
                lines += ["In " + ", ".join(f"`{_command_title(c)}`" for c in commands) + ":", ""]
            lines += _key_table(list(rows)) + [""]
    return lines


def render_reference() -> str:
    """The Markdown text of ``docs/configuration.md``: every command's groups and keys, then every group option."""
    from storefed.config.store import ROOT_CONFIGS

    lines = [
        "# Configuration reference",
        "",
        (f"> Generated from `storefed/config/schema.py` by `storefed.config.reference`; do not edit by hand. "
         f"Regenerate with `{REGENERATE}`."),
        "",
        ("Every command composes one typed configuration (hydra structured configs): its root config, one "
         "option per config group, then the overrides given on the command line, e.g. "
         "`storefed simulate task=review privacy.epsilon=3 federation.rounds=10`. "
         "`group=option` picks a group option (the defaults of its keys change with it); `key=value` sets one "
         "key, with YAML values: `null`, `true`/`false`, lists as `[a,b]`. `???` marks a key that must be given. "
         "Ranges are checked before any work starts; `storefed COMMAND --help` lists the same keys."),
        "",
        "## Commands",
        "",
    ]
    for command in ROOT_CONFIGS:
        lines += _render_command(command)
    lines += ["## Config groups", ""]
    for group in dict.fromkeys(g for c in ROOT_CONFIGS for g in command_groups(c)):
        lines += _render_group(group)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
