"""What the config kinds read alike: unknown top-level keys, the warning cap, the tokenizer keys (§4).

Used by the merge (mergebot.config.dense) and the mergekit-moe (mergebot.config.moe) parsers.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from mergebot.config.refs import ModelRef, parse_ref
from mergebot.config.yamlsafe import YamlDoc, keypath, short

BUILTIN_CHAT_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral", "exaone")
MAX_PAD_MULTIPLE = 1024  # tokenizer.pad_to_multiple_of: real values are 8 to 256; 1e12 would allocate terabytes
MAX_WARNINGS = 50  # per config: 20,000 unknown keys must not print 20,000 lines


def kind_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                            type(value).__name__)


def warnings_full(warnings: list[str], file: str) -> bool:
    """True once MAX_WARNINGS are held (callers stop building messages); the first time, one line says so."""
    if len(warnings) < MAX_WARNINGS:
        return False
    if len(warnings) == MAX_WARNINGS:
        warnings.append(f"{file}: more warnings not shown")
    return True


def add_warning(warnings: list[str], file: str, msg: str) -> None:
    """Append `msg` once, up to MAX_WARNINGS."""
    if not warnings_full(warnings, file) and msg not in warnings:
        warnings.append(msg)


def unknown_keys(doc: YamlDoc, known: tuple[str, ...], warnings: list[str]) -> None:
    """A warning per unknown top-level key (mergekit ignores them), with a hint when one is close."""
    for key in doc.data:
        if key in known:
            continue
        if warnings_full(warnings, doc.file):
            return
        hint = difflib.get_close_matches(str(key), known, n=1)
        add_warning(warnings, doc.file, f"{doc.file}: {keypath((key,))} (line {doc.line((key,))}): unknown "
                    "top-level key, ignored" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def mapping(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping of parameter names to values, got {short(value)}")
    return value




def check_tokenizer_source(doc: YamlDoc, path: tuple[Any, ...], value: Any, models: list[ModelRef] | None) -> None:
    """`base`, `union` or one of the config's own models (legacy `model:` prefix allowed); `models` None: not
    known yet (a `modules:` config), only the reference syntax is checked.

    mergekit takes any other string for a Hub repo id and fails only while merging (`unoin`), or fetches the
    tokenizer of a model the merge does not use; here it is a one-line error at validate time, with a hint when
    the value is close to a valid choice."""
    if not isinstance(value, str):
        raise doc.error(path, f"expected 'union', 'base' or one of the config's models, got {short(value)}")
    if value in ("union", "base"):
        return
    ref = parse_ref(doc, path, value.removeprefix("model:"))
    if models is None:
        return
    known = {m.path: m for m in models}
    if ref.path in known or os.path.normpath(ref.path) in {os.path.normpath(p) for p in known}:
        return
    choices = ["union", "base", *known]
    hint = difflib.get_close_matches(value.removeprefix("model:"), choices, n=1, cutoff=0.6)
    listed = ", ".join(repr(c) for c in choices[:6]) + (", ..." if len(choices) > 6 else "")
    raise doc.error(path, f"tokenizer source {short(value)} is neither 'base', 'union' nor one of this config's "
                          "models" + (f"; did you mean {hint[0]!r}?" if hint else f" ({listed})"))


def tokenizer_keys(doc: YamlDoc, data: dict[str, Any], pending: list[str],
                    models: list[ModelRef] | None) -> tuple[Any, Any, Any]:
    tok_src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    chat = data.get("chat_template")
    if tok_src is not None and tok is not None:
        raise doc.error(("tokenizer",), "use either 'tokenizer_source' (legacy) or 'tokenizer:', not both")
    if tok_src is not None:
        check_tokenizer_source(doc, ("tokenizer_source",), tok_src, models)
    if tok is not None:
        if not isinstance(tok, dict):
            raise doc.error(("tokenizer",), "expected a mapping {source, tokens, pad_to_multiple_of}")
        for key in tok:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise doc.error(("tokenizer", key), "unknown key (source, tokens, pad_to_multiple_of)")
        check_tokenizer_source(doc, ("tokenizer", "source"), tok.get("source", "union"), models)
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise doc.error(("tokenizer", "pad_to_multiple_of"), f"expected a positive integer, got {short(pad)}")
        if pad is not None and pad > MAX_PAD_MULTIPLE:
            raise doc.error(("tokenizer", "pad_to_multiple_of"), f"pad_to_multiple_of {pad} is too large (at most "
                            f"{MAX_PAD_MULTIPLE}; the vocabulary is padded up to a multiple of it)")
        tokens = tok.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, dict):
                raise doc.error(("tokenizer", "tokens"), "expected a mapping of token strings to {source, force}")
            for name, spec in tokens.items():
                p = ("tokenizer", "tokens", name)
                if not isinstance(name, str) or not name:  # `~:` would add a token "None", `'':` nothing at all
                    raise doc.error(p, f"expected a token string as the key, got {short(name)}")
                if not isinstance(spec, dict):
                    raise doc.error(p, "expected {source: ..., force: bool}")
                if "force" in spec and not isinstance(spec["force"], bool):
                    raise doc.error(p + ("force",), "expected true or false")
                s = spec.get("source")
                if isinstance(s, dict):
                    kind = s.get("kind")
                    if kind not in ("model_token", "zero"):
                        raise doc.error(p + ("source", "kind"), f"expected 'model_token' or 'zero', got {kind!r}")
                    if kind == "model_token":
                        if "model" not in s:
                            raise doc.error(p + ("source",), "model_token needs 'model'")
                        if ("token_id" in s) == ("token" in s):
                            raise doc.error(p + ("source",), "model_token needs exactly one of 'token_id' and 'token'")
                        tid = s.get("token_id")
                        if "token_id" in s and (not isinstance(tid, int) or isinstance(tid, bool)
                                                or not 0 <= tid < 1 << 31):
                            raise doc.error(p + ("source", "token_id"),
                                            f"expected a token id (an integer from 0 to 2^31 - 1), got {short(tid)}")
                elif s is not None and not isinstance(s, str):
                    raise doc.error(p + ("source",), "expected a model reference or {kind: ...}")
    if chat is not None:
        if not isinstance(chat, str) or not chat.strip():
            raise doc.error(("chat_template",), "expected 'auto', a built-in name or a Jinja template string")
        if chat != "auto" and chat not in BUILTIN_CHAT_TEMPLATES and (len(chat) < 20 or "{" not in chat):
            raise doc.error(("chat_template",), f"invalid chat template {short(chat)}: not 'auto', not a built-in "
                            f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) and not a Jinja template")
    return tok_src, tok, chat

