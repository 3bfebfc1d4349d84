"""YAML loading that is safe and remembers where every key was.

Built on `yaml.SafeLoader` (no object construction), with:
- duplicate mapping keys rejected (PyYAML silently keeps the last one),
- anchors/aliases allowed but the expanded document bounded (no "billion laughs"),
- the source line of every key path recorded, so errors can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

MAX_NODES = 200_000  # expanded nodes, aliases counted at every use
MAX_ALIASES = 1_000


def keypath(parts: tuple[Any, ...]) -> str:
    """('models', 1, 'parameters') -> 'models[1].parameters'."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


@dataclass
class YamlDoc:
    """A parsed YAML document plus the line of each key path (1-based)."""

    data: Any
    file: str
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def line(self, path: tuple[Any, ...]) -> int | None:
        """Line of the closest enclosing key path that we know."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def error(self, path: tuple[Any, ...], reason: str) -> ConfigError:
        return ConfigError(self.file, keypath(path) or None, self.line(path), reason)


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.file = file
        self.nodes = 0
        self.lines: dict[tuple[Any, ...], int] = {}

    def build(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConfigError(self.file, None, None,
                              f"document expands to more than {MAX_NODES} nodes (anchor/alias bomb?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # YAML merge keys (<<)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise ConfigError(self.file, keypath(path) or None, key_node.start_mark.line + 1,
                                      "mapping keys must be plain scalars")
                if key in out:
                    raise ConfigError(self.file, keypath(path + (key,)), key_node.start_mark.line + 1,
                                      f"duplicate key {key!r} (the first is on line {self.lines.get(path + (key,), '?')})")
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)


class _CountingLoader(yaml.SafeLoader):
    aliases = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.MarkedYAMLError(None, None, f"more than {MAX_ALIASES} aliases", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, file: str) -> YamlDoc:
    """Parse one YAML document; every problem is a ConfigError naming file and line."""
    docs = load_yaml_all(text, file)
    if len(docs) > 1:
        raise ConfigError(file, None, docs[1].line(()), "several YAML documents (---) in one file: a mergekit-multi "
                          "file; `mergebot merge`/`validate` read it (bot.configfile.load)")
    return docs[0] if docs else YamlDoc(None, file, {})


def load_yaml_all(text: str, file: str) -> list[YamlDoc]:
    """Every document of a file (mergekit-multi files have several, separated by `---`); empty documents are
    dropped. The alias and node limits apply to the whole file. Lines are the file's lines."""
    loader = _CountingLoader(text)
    builder = _Builder(loader, file)
    docs: list[YamlDoc] = []
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                reason = " ".join(str(x) for x in (e.context, e.problem) if x)
                raise ConfigError(file, None, mark.line + 1 if mark else None, f"YAML syntax error: {reason}") from None
            except yaml.YAMLError as e:
                raise ConfigError(file, None, None, f"YAML error: {e}") from None
            if node is None:
                continue
            builder.lines = {}
            try:
                data = builder.build(node, ())
            except yaml.constructor.ConstructorError as e:
                mark = e.problem_mark
                raise ConfigError(file, None, mark.line + 1 if mark else None, f"YAML error: {e.problem}") from None
            if data is not None:
                docs.append(YamlDoc(data, file, builder.lines))
        return docs
    finally:
        loader.dispose()
