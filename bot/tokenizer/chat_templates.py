"""Chat templates (merge-semantics.md §5.6): `auto`, the built-in names, or a literal Jinja string.

The built-ins are written here for mergebot (Hugging Face chat-template Jinja: `messages`, `bos_token`,
`eos_token`, `add_generation_prompt`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergebot.errors import ModelError
from mergebot.io import confine

BUILTIN: dict[str, str] = {
    "alpaca": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}"
        "{% else %}{{ raise_exception('alpaca: unknown role ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] | trim + '\\n\\n' %}{% set rest = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in rest %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('mistral: roles must alternate user/assistant') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def is_builtin_name(value: str) -> bool:
    """§5.6: a built-in name is short, one line, no '{', and names an existing template."""
    return len(value) < 256 and "\n" not in value and "{" not in value and value in BUILTIN


def read_template(directory: Path) -> str | None:
    """A model's chat template: chat_template.jinja (what transformers reads first), chat_template.json,
    then tokenizer_config.json `chat_template` (a string, or a list of named templates: the "default")."""
    label = f"model {directory.name}"
    try:
        text = confine.read_text(directory, "chat_template.jinja", label)
    except ModelError:
        text = None  # not UTF-8: as if absent (an escaping link was refused when the model was resolved)
    if text is not None:
        return text
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = confine.json_object(directory, name, label)
        t = data.get("chat_template") if data is not None else None
        if isinstance(t, list):
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict) and isinstance(e.get("name"), str)}
            t = named.get("default")
        if isinstance(t, str) and t.strip():
            return t
    return None


def resolve_template(value: str, parents: list[Path]) -> tuple[str | None, str | None]:
    """(template text or None, warning or None). `auto`: the most common stripped template among the parents
    that have one, ties broken by config order (mergekit's order there depends on the hash seed, §5.8)."""
    if value == "auto":
        found = [t.strip() for t in (read_template(d) for d in parents) if t and t.strip()]
        if not found:
            return None, "chat_template: auto: no parent model has a chat template; none set"
        return Counter(found).most_common(1)[0][0], None
    if is_builtin_name(value):
        return BUILTIN[value], None
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"Invalid chat template {value!r}")
    return value, None


def apply_template(work: Path, template: str) -> None:
    """Store the template in the output: chat_template.jinja (read first by transformers >= 4.43) and
    tokenizer_config.json `chat_template` (older readers); a chat_template.json is kept consistent."""
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = work / name
        if name == "chat_template.json" and not f.is_file():
            continue
        data: dict = {}
        if f.is_file():
            try:
                loaded = json.loads(f.read_text(encoding="utf-8"))
                data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError, RecursionError):  # a donor's file nested too deep for json
                data = {}
        data["chat_template"] = template
        f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
