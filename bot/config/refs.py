"""Model references (merge-semantics.md §1.1): one grammar and one local-vs-Hub rule for the whole package.

Grammar: `path[@revision][+lora[@revision]]`, or in YAML the object form {model|path, revision, lora,
override_architecture}. `parse_ref_text` is the strict reading (a config, a tokenizer source); `split_ref`
splits the same way without judging (refs read back from a lock file, which mergebot wrote itself).

Local or Hub: `is_repo_id` is mergekit's rule (§6): absolute, home-relative, dotted or multi-slash paths
(or Windows separators) are local, anything else may name a Hub repo. A directory that exists wins over a
repo id wherever one is looked for (mergebot.io.local).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebot.config.yamlsafe import YamlDoc, short

MAX_REF_CHARS = 4096  # a model reference (a path is at most 4096 bytes on Linux)


@dataclass(frozen=True)
class ModelRef:
    """`path[@revision][+lora[@revision]]` or the object form (§1.1)."""

    path: str
    revision: str | None = None
    lora: ModelRef | None = None
    override_architecture: str | None = None

    def __str__(self) -> str:
        s = self.path + (f"@{self.revision}" if self.revision else "")
        return s + (f"+{self.lora}" if self.lora else "")

    @property
    def base_key(self) -> tuple[str, str | None]:
        """Identity of the weights to load, without the LoRA."""
        return (self.path, self.revision)


class RefSyntaxError(ValueError):
    """A model reference that breaks the grammar; the message is the reason (no file or line)."""


def unique(refs: Iterable[ModelRef | None]) -> list[ModelRef]:
    """The references in order, each once (§5.8: config order, never hash order); None entries skipped."""
    seen: dict[str, ModelRef] = {}
    for ref in refs:
        if ref is not None:
            seen.setdefault(str(ref), ref)
    return list(seen.values())


def _parts(text: str) -> list[list[str]]:
    """The grammar's tokens: `+`-separated parts, each `@`-separated."""
    return [part.split("@") for part in text.split("+")]


def split_ref(text: str) -> tuple[str, str | None, str | None]:
    """(path, revision, lora) of a reference, unjudged: what a card or a lock reader needs of a ref mergebot
    itself wrote (`org/name@v1+adapter` -> ('org/name', 'v1', 'adapter'))."""
    parts = _parts(text)
    head = parts[0]
    revision = "@".join(head[1:]) or None
    lora = "+".join("@".join(p) for p in parts[1:]) or None
    return head[0], revision, lora


def check_plain(text: str, what: str) -> None:
    """Names that end up in paths, URLs and one-line messages: printable and of sane length."""
    if len(text) > MAX_REF_CHARS:
        raise RefSyntaxError(f"{what} of {len(text):,} characters is too long (at most {MAX_REF_CHARS:,})")
    if not text.isprintable():
        raise RefSyntaxError(f"{what} {short(text)} contains a control or non-printing character")


def parse_ref_text(text: str) -> ModelRef:
    """The strict reading of `path[@rev][+lora[@rev]]`; every problem is a RefSyntaxError."""
    check_plain(text, "model reference")
    if not text.strip():
        raise RefSyntaxError("empty model reference")
    parts = _parts(text)
    if len(parts) > 2:
        raise RefSyntaxError(f"model reference {text!r} has more than one '+' (expected path[@rev][+lora[@rev]])")
    pieces: list[tuple[str, str | None]] = []
    for bits in parts:
        if len(bits) > 2:
            raise RefSyntaxError(f"model reference {text!r} has more than one '@' in {'@'.join(bits)!r}")
        if not bits[0].strip() or (len(bits) == 2 and not bits[1].strip()):
            raise RefSyntaxError(f"model reference {text!r}: empty path or revision")
        pieces.append((bits[0].strip(), bits[1].strip() if len(bits) == 2 else None))
    lora = ModelRef(*pieces[1]) if len(pieces) == 2 else None
    return ModelRef(pieces[0][0], pieces[0][1], lora)


def is_repo_id(path: str) -> bool:
    """`owner/name` or `name`, not a filesystem path (§6: '/', '~' or '.' prefix, more than one '/', or '\\')."""
    return not (path.startswith(("/", "~", ".")) or path.count("/") > 1 or "\\" in path)


def looks_local(path: str) -> bool:
    """A path by the rule above, or one that exists on disk (the Hub is never asked: offline-friendly)."""
    return not is_repo_id(path) or Path(path).exists()


# ------------------------------------------------------------------------------------------ in a YAML document

def _checked(doc: YamlDoc, path: tuple[Any, ...], text: str, what: str) -> None:
    try:
        check_plain(text, what)
    except RefSyntaxError as e:
        raise doc.error(path, str(e)) from None


def parse_ref_string(doc: YamlDoc, path: tuple[Any, ...], text: str) -> ModelRef:
    """`parse_ref_text` with errors naming the file, key path and line."""
    try:
        return parse_ref_text(text)
    except RefSyntaxError as e:
        raise doc.error(path, str(e)) from None


def parse_ref(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> ModelRef:
    """A model reference: string form, or {model|path, revision, lora, override_architecture}."""
    if isinstance(value, str):
        return parse_ref_string(doc, path, value)
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a model reference (a Hub repo id or a local path), got {value!r}")
    known = {"model", "path", "revision", "lora", "override_architecture"}
    extra = set(value) - known
    if extra:
        raise doc.error(path + (min(extra, key=str),),
                        f"unknown key in a model reference (known: {', '.join(sorted(known))})")
    if "model" in value:
        inner = value["model"]
        if isinstance(inner, str):
            ref = parse_ref_string(doc, path + ("model",), inner)
        elif isinstance(inner, dict):
            ref = parse_ref(doc, path + ("model",), inner)
        else:
            raise doc.error(path + ("model",), f"expected a model path, got {inner!r}")
    elif "path" in value:
        if not isinstance(value["path"], str) or not value["path"].strip():
            raise doc.error(path + ("path",), "expected a non-empty string")
        _checked(doc, path + ("path",), value["path"], "model path")
        rev = value.get("revision")
        if rev is not None and not isinstance(rev, str):
            raise doc.error(path + ("revision",), "expected a string (branch, tag or commit sha)")
        if rev is not None:
            _checked(doc, path + ("revision",), rev, "revision")
        ref = ModelRef(value["path"].strip(), rev)
    else:
        raise doc.error(path, "a model reference needs 'model' or 'path'")
    lora = ref.lora
    if value.get("lora") is not None:
        lora = parse_ref(doc, path + ("lora",), value["lora"])
    arch = value.get("override_architecture")
    if arch is not None and (not isinstance(arch, str) or not arch.isidentifier()):
        raise doc.error(path + ("override_architecture",), "expected an architecture name such as LlamaForCausalLM")
    return ModelRef(ref.path, ref.revision, lora, arch or ref.override_architecture)
