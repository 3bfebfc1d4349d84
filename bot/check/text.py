"""The evaluation text, the tokenizer that turns it into ids, the generation prompts, and the repetition test.

The built-in text (data/eval.txt, data/chat.json) was written for mergebot: prose in six languages, two short
programs and a chat exchange. The chat exchange is rendered with the merge's own chat template when it has one,
so an instruct merge is measured on the format it will be used with; every model of a check (merge and
parents) is scored on the same rendered string, so their numbers compare. Templates are strangers' Jinja:
they run in jinja2's immutable sandbox, in a child process with a deadline and a memory cap (`chat_render`), and
a template that fails falls back to a plain rendering.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mergebot.check import chat_render
from mergebot.errors import ModelError
from mergebot.io import confine
from mergebot.tokenizer.chat_templates import read_template

BUILTIN_NAME = "mergebot built-in evaluation text v1"
MAX_EVAL_FILE = 1 << 20  # --eval-text: a few KB are expected; a megabyte is already minutes of CPU per model

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The three things to remember when you learn a new language are",
    "def is_prime(n: int) -> bool:\n",
    "Question: Why do leaves change colour in autumn?\nAnswer:",
)


@dataclass
class EvalText:
    """The text a check scores: named sections (each tokenized on its own), and where it came from."""

    name: str
    sha256: str
    nbytes: int
    sections: list[tuple[str, str]]
    chat: str  # how the chat section was rendered ("" when there is none)


def _data(name: str) -> str:
    return resources.files("mergebot.check").joinpath("data", name).read_text(encoding="utf-8")


def builtin_sections() -> list[tuple[str, str]]:
    """data/eval.txt split at its `@@ name` lines."""
    sections: list[tuple[str, str]] = []
    name: str | None = None
    lines: list[str] = []
    for line in _data("eval.txt").splitlines(keepends=True):
        if line.startswith("@@ "):
            if name is not None:
                sections.append((name, "".join(lines).strip("\n") + "\n"))
            name, lines = line[3:].strip(), []
        else:
            lines.append(line)
    if name is not None:
        sections.append((name, "".join(lines).strip("\n") + "\n"))
    return sections


def chat_messages() -> list[dict[str, str]]:
    return json.loads(_data("chat.json"))


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken object ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def render_chat(directory: Path, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(text, how): the exchange in the model's chat template (sandboxed), else as plain 'Role: text' lines."""
    plain = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    template = read_template(directory)
    if not template:
        return plain, "plain (the model has no chat template)"
    tok_cfg = confine.json_object(directory, "tokenizer_config.json", f"model {directory.name}") or {}
    try:
        text = chat_render.render(template, messages, _token_text(tok_cfg.get("bos_token")),
                                  _token_text(tok_cfg.get("eos_token")))
    except chat_render.RenderError as e:  # a stranger's template may fail any way; the check goes on
        return plain, f"plain (the chat template failed: {e.reason})"
    return text, "the model's chat template"


def load_eval_text(eval_file: Path | None, merge_dir: Path) -> EvalText:
    """The user's file (one section), or the built-in text with the chat rendered for the merge."""
    if eval_file is not None:
        label = "--eval-text"
        confine.local_reference(str(eval_file), label)
        root = confine.workspace()
        if root is not None:  # in the Action: the path is the repository's, whatever the working directory
            eval_file = root / eval_file
        if not eval_file.is_file():
            raise ModelError(f"{label}: {eval_file}: no such file")
        data = confine.read_bytes(eval_file.parent, eval_file.name, label, MAX_EVAL_FILE)
        if data is None:
            raise ModelError(f"{label}: {eval_file}: no such file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{label}: {eval_file} is not UTF-8 text") from None
        if not text.strip():
            raise ModelError(f"{label}: {eval_file} is empty")
        return EvalText(eval_file.name, hashlib.sha256(data).hexdigest(), len(data), [("custom", text)], "")
    sections = builtin_sections()
    chat, how = render_chat(merge_dir, chat_messages())
    sections.append(("chat", chat))
    blob = "".join(f"@@ {n}\n{t}" for n, t in sections).encode("utf-8")
    return EvalText(BUILTIN_NAME, hashlib.sha256(blob).hexdigest(), len(blob), sections, how)


class TextTokenizer:
    """A model's tokenizer: tokenizer.json through the `tokenizers` library (read via confine), else
    transformers' AutoTokenizer when it is installed (sentencepiece-only models)."""

    def __init__(self, directory: Path, label: str):
        self.label = label
        cfg = confine.json_object(directory, "tokenizer_config.json", label) or {}
        self._fast = None
        self._auto = None
        raw = confine.read_text(directory, "tokenizer.json", label)
        if raw is not None:
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_str(raw)
            except Exception as e:  # noqa: BLE001 - a malformed file from a stranger
                raise ModelError(f"{label}: tokenizer.json cannot be read: {str(e)[:200]}") from None
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ModelError(f"{label}: no tokenizer.json (install transformers to read other tokenizer "
                                 "formats)") from None
            confine.audit(directory, label)
            try:
                self._auto = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"{label}: cannot load the tokenizer: {type(e).__name__}: {str(e)[:200]}") from None
        bos = _token_text(cfg.get("bos_token"))
        self.bos_id = self._id(bos) if bos else None
        self.add_bos = cfg.get("add_bos_token") is True and self.bos_id is not None

    def _id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        assert self._auto is not None
        found = self._auto.convert_tokens_to_ids(token)
        return found if isinstance(found, int) else None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Ids as the model's own tokenizer gives them; `special`: with its BOS/post-processing (plain text),
        without (a rendered chat template already holds its special tokens)."""
        if self._fast is not None:
            ids = self._fast.encode(text, add_special_tokens=special).ids
        else:
            assert self._auto is not None
            ids = list(self._auto.encode(text, add_special_tokens=special))
        bos = self.bos_id
        if special and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        assert self._auto is not None
        return str(self._auto.decode(ids, skip_special_tokens=True))


def windows(tok: TextTokenizer, text: EvalText, window: int, max_tokens: int) -> tuple[list[list[int]], bool]:
    """Token windows of at most `window` ids (each section on its own, long ones cut), at most `max_tokens` ids
    in all; (windows, whether the text was cut short)."""
    out: list[list[int]] = []
    used, cut = 0, False
    for name, body in text.sections:
        ids = tok.encode(body, special=name != "chat")
        for start in range(0, len(ids), window):
            piece = ids[start:start + window]
            if used + len(piece) > max_tokens:
                piece = piece[:max_tokens - used]
                cut = True
            if len(piece) >= 2:
                out.append(piece)
                used += len(piece)
            if cut:
                return out, True
    return out, cut


def degenerate(tokens: list[int], text: str) -> str | None:
    """Why a greedy continuation looks broken, or None. Conservative on purpose (a 16-token continuation of a
    good model may repeat a word): empty output, one token filling most of it, or most of its bigrams
    repeating (a loop of a few tokens)."""
    if not tokens or not text.strip():
        return "empty continuation"
    n = len(tokens)
    if n >= 4:
        token, count = Counter(tokens).most_common(1)[0]
        if count >= 0.6 * n:
            return f"one token (id {token}) fills {count} of {n} positions"
    if n >= 6:
        bigrams = list(zip(tokens, tokens[1:]))
        repeats = len(bigrams) - len(set(bigrams))
        if repeats > 0.5 * len(bigrams):
            return f"repetitive: {repeats} of {len(bigrams)} token pairs repeat an earlier pair"
    return None
