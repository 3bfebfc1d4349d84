"""YAML loading that is total: any bytes give documents or exactly one ConfigError line.

Configs come from strangers (the Action merges whatever a pull request pushes), so nothing here may raise a
traceback, recurse without bound, hang or grow memory with a crafted file. Built on `yaml.SafeLoader` (no object
construction), with:
- the file read from a regular file only, at most MAX_BYTES, decoded as strict UTF-8 (the error names the line),
- control characters (NUL, ESC, ...) refused with line and column before PyYAML sees them,
- nesting depth bounded while composing (PyYAML's composer recurses once per level: 5000 levels would be a
  RecursionError) and again while building (aliases can nest a document deeper than its text),
- composed nodes, aliases and the expanded document bounded (no "billion laughs"), merge keys (`<<`) expanded
  under the same bound (PyYAML's own flattening can double a list per alias level),
- duplicate mapping keys rejected (PyYAML silently keeps the last one); keys must be plain scalars,
- integers beyond 64 bits refused (no config number needs them, and Python cannot even print one of 5000 digits),
- every exception PyYAML or Python raises while loading turned into a ConfigError with the line when known,
- the source line of every key path recorded, so later errors can point at it.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebot.errors import ConfigError

MAX_BYTES = 1 << 20  # a config file; the largest real one is a few KB
MAX_DEPTH = 100  # nesting levels, aliases followed
MAX_COMPOSED = 50_000  # nodes as written (a large real config has a few thousand)
MAX_NODES = 100_000  # expanded nodes, aliases counted at every use
MAX_ALIASES = 1_000
MAX_DOCUMENTS = 100  # `---`-separated documents (mergekit-multi stages)
MAX_INT_BITS = 64
MAX_REASON = 400  # characters of a reason; values quoted in it are cut, the line stays readable

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"
_STR_TAG = "tag:yaml.org,2002:str"
# What YAML 1.1 (and PyYAML's reader) accepts: tab, line breaks and printable characters.
_NOT_TEXT = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def oneline(text: str, limit: int = MAX_REASON) -> str:
    """One line of at most `limit` characters: an error must stay one readable line whatever it quotes."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def short(value: Any, limit: int = 80) -> str:
    """repr of a value for an error message, cut to `limit` characters (a stranger's value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _key_text(part: Any) -> str:
    """A key as it may appear in a key path: plain when it is short printable text, else quoted and cut."""
    if isinstance(part, str) and part.isprintable() and 0 < len(part) <= 80:
        return part
    return short(part)


def keypath(parts: tuple[Any, ...]) -> str:
    """('models', 1, 'parameters') -> 'models[1].parameters'; a path 100 levels deep keeps its ends."""
    if len(parts) > 12:
        return keypath(parts[:6]) + "…" + keypath(parts[-4:]).lstrip(".")
    out = ""
    for p in parts:
        if isinstance(p, int) and not isinstance(p, bool):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + _key_text(p)
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
        return ConfigError(self.file, keypath(path) or None, self.line(path), oneline(reason))


# ------------------------------------------------------------------------------------------------ bytes

def read_text(path: str | Path, limit: int = MAX_BYTES) -> str:
    """A config file's text: a regular file of at most `limit` bytes, strict UTF-8, plain text characters.

    Opened non-blocking so a FIFO cannot hang us, and read with a bound so /dev/zero or a 50 MB file cannot
    fill memory; every failure is a ConfigError naming the file."""
    file = str(path)
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(file, None, None, "no such file") from None
    except OSError as e:
        raise ConfigError(file, None, None, oneline(f"cannot read: {e.strerror or e}")) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(file, None, None, "is a directory, not a config file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(file, None, None, "not a regular file (a config is a YAML text file)")
        if st.st_size > limit:
            raise ConfigError(file, None, None, _too_big(st.st_size, limit))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise ConfigError(file, None, None, oneline(f"cannot read: {e.strerror or e}")) from None
    if len(data) > limit:
        raise ConfigError(file, None, None, _too_big(len(data), limit))
    return decode(data, file)


def _too_big(size: int, limit: int) -> str:
    return f"file is {size:,} bytes; a config is at most {limit:,} bytes ({limit >> 10} KiB)"


def decode(data: bytes, file: str) -> str:
    """Strict UTF-8 (a leading BOM is allowed); the error names the line and column of the first bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(file, None, 1, "file is UTF-16 text; save the config as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(file, None, line, f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} "
                          "cannot be decoded (save the config as UTF-8)") from None


def check_text(text: str, file: str, limit: int = MAX_BYTES) -> None:
    """Refuse text PyYAML should not see: too long, or with characters a YAML text file cannot hold."""
    if not isinstance(text, str):
        raise ConfigError(file, None, None, f"expected text, got {type(text).__name__}")
    if len(text) > limit:  # cheap first: characters never outnumber bytes
        raise ConfigError(file, None, None, _too_big(len(text), limit))
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ConfigError(file, None, None, _too_big(size, limit))
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        pos = bad.start()
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        raise ConfigError(file, None, line, f"{_char_name(bad.group())} at column {column}: a config is plain "
                          "text (tabs, line breaks and printable characters only)")


def _char_name(c: str) -> str:
    code = ord(c)
    if code == 0:
        return "NUL byte (U+0000; is this a binary file?)"
    if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
        return f"control character U+{code:04X}"
    if 0xD800 <= code < 0xE000:
        return f"lone surrogate U+{code:04X}"
    return f"non-character U+{code:04X}"


# ------------------------------------------------------------------------------------------------ parsing

class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts what it builds and stops at MAX_DEPTH before Python's stack would."""

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.file = file
        self.depth = 0
        self.composed = 0
        self.aliases = 0

    def _limit(self, event: yaml.Event, reason: str) -> ConfigError:
        mark = event.start_mark
        return ConfigError(self.file, None, mark.line + 1 if mark else None, reason)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise self._limit(event, f"more than {MAX_ALIASES} aliases (*name)")
        else:
            self.composed += 1
            if self.composed > MAX_COMPOSED:
                raise self._limit(event, f"more than {MAX_COMPOSED:,} YAML nodes")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self._limit(event, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    """Nodes -> Python values, recording each key path's line; bounded in nodes and depth (aliases expanded)."""

    def __init__(self, loader: _BoundedLoader, file: str, duplicates: str = "error"):
        self.loader = loader
        self.file = file
        self.duplicates = duplicates  # "error" (configs) or "last" (model cards, as PyYAML reads them)
        self.nodes = 0
        self.line = 1  # line and key path of the node being built, for errors without a mark
        self.path: tuple[Any, ...] = ()
        self.lines: dict[tuple[Any, ...], int] = {}

    def error(self, path: tuple[Any, ...], line: int | None, reason: str) -> ConfigError:
        return ConfigError(self.file, keypath(path) or None, line, oneline(reason))

    def build(self, node: yaml.Node, path: tuple[Any, ...], depth: int = 1) -> Any:
        self.nodes += 1
        line = node.start_mark.line + 1
        self.line, self.path = line, path
        if self.nodes > MAX_NODES:
            raise self.error(path, line, f"document expands to more than {MAX_NODES:,} nodes (anchor/alias bomb?)")
        if depth > MAX_DEPTH:
            raise self.error(path, line, f"nested more than {MAX_DEPTH} levels deep (through aliases; a "
                                         "recursive alias?)")
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        line = node.start_mark.line + 1
        self.line, self.path = line, path
        if node.tag == _INT_TAG and len(node.value) > 40:  # before int() meets Python's digit limit
            raise self.error(path, line, f"integer of {len(node.value):,} characters is too large")
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise self.error(path, line, f"integer of {value.bit_length()} bits is too large "
                                         f"(at most {MAX_INT_BITS} bits)")
        return value

    def _mapping(self, node: yaml.MappingNode, path: tuple[Any, ...], depth: int) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:  # `<<: *base` or `<<: [*a, *b]`; the first listed wins
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in reversed(sources):
                    if not isinstance(src, yaml.MappingNode):
                        raise self.error(path, line, "a merge key (<<) takes a mapping or a list of mappings")
                    merged.update(self.build(src, path, depth + 1))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(path, line, "mapping keys must be plain scalars")
            if key_node.tag == _VALUE_TAG:
                key_node.tag = _STR_TAG
            key = self._scalar(key_node, path)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise self.error(path, line, "mapping keys must be plain scalars")
            if key in out and self.duplicates == "error":
                raise self.error(path + (key,), line, f"duplicate key {short(key)} (the first is on line "
                                                      f"{self.lines.get(path + (key,), '?')})")
            self.lines[path + (key,)] = line
            out[key] = self.build(value_node, path + (key,), depth + 1)
        if merged:
            for key in out:
                merged.pop(key, None)  # explicit keys override merged ones and keep their place
            merged.update(out)
            return merged
        return out


def load_yaml(text: str, file: str) -> YamlDoc:
    """Parse one YAML document; every problem is a ConfigError naming file and line."""
    docs = load_yaml_all(text, file)
    if len(docs) > 1:
        raise ConfigError(file, None, docs[1].line(()), "several YAML documents (---) in one file: a mergekit-multi "
                          "file; `mergebot merge`/`validate` read it (mergebot.config.configfile.load)")
    return docs[0] if docs else YamlDoc(None, file, {})


def load_file(path: str | Path) -> tuple[str, list[YamlDoc]]:
    """A config file's text and its documents, read and parsed under every bound above."""
    text = read_text(path)
    return text, load_yaml_all(text, str(path))


def load_yaml_all(text: str, file: str, *, duplicates: str = "error") -> list[YamlDoc]:
    """Every document of a file (mergekit-multi files have several, separated by `---`); empty documents are
    dropped. The bounds apply to the whole file. Lines are the file's lines."""
    check_text(text, file)
    loader = _BoundedLoader(text, file)
    builder = _Builder(loader, file, duplicates)
    docs: list[YamlDoc] = []
    stage = "parse"
    try:
        while True:
            stage = "parse"
            if not loader.check_node():
                break
            node = loader.get_node()
            if node is None:
                continue
            stage = "build"
            builder.lines = {}
            data = builder.build(node, ())
            if data is not None:
                docs.append(YamlDoc(data, file, builder.lines))
                if len(docs) > MAX_DOCUMENTS:
                    raise ConfigError(file, None, node.start_mark.line + 1,
                                      f"more than {MAX_DOCUMENTS} YAML documents (---) in one file")
        return docs
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(str(x) for x in (e.context, e.problem) if x)
        if stage == "parse":
            raise ConfigError(file, None, mark.line + 1 if mark else _parse_line(loader),
                              oneline(f"YAML syntax error: {reason}")) from None
        raise builder.error(builder.path, mark.line + 1 if mark else builder.line, f"YAML error: {reason}") from None
    except (yaml.YAMLError, RecursionError, MemoryError, Exception) as e:
        # ValueError (a bad !!int or !!timestamp), OverflowError, ...: still one line, never a traceback
        if isinstance(e, RecursionError):
            reason = "nested too deeply to read"
        elif isinstance(e, MemoryError):
            reason = "too large to read into memory"
        elif isinstance(e, yaml.YAMLError):
            reason = f"YAML error: {e}"
        else:
            reason = f"cannot read a value: {type(e).__name__}: {e}"
        if stage == "parse":
            raise ConfigError(file, None, _parse_line(loader), oneline(reason)) from None
        raise builder.error(builder.path, builder.line, reason) from None
    finally:
        loader.dispose()


def _parse_line(loader: _BoundedLoader) -> int | None:
    """The line the reader had reached when something without a mark failed."""
    try:
        return loader.get_mark().line + 1
    except Exception:
        return None


def load_front_matter(text: str, label: str) -> dict[str, Any]:
    """A model card's YAML front matter (the text between its `---` lines) under the same bounds as a config.

    Duplicate keys are allowed (the last wins, as PyYAML and the Hub read cards). Raises ConfigError naming
    `label`; an empty front matter is {}."""
    docs = load_yaml_all(text, label, duplicates="last")
    if not docs:
        return {}
    if len(docs) > 1:
        raise ConfigError(label, None, docs[1].line(()), "front matter holds several YAML documents")
    data = docs[0].data
    if not isinstance(data, dict):
        raise ConfigError(label, None, docs[0].line(()), f"front matter must be a mapping, got {type(data).__name__}")
    return data
