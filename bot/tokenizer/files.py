"""The tokenizer files of a merge's output (merge-semantics.md §4.5 and §5.6).

* Tokenizer path (tokenizer_source / tokenizer:): the built tokenizer as tokenizer.json, the donor's
  tokenizer_config.json (special tokens kept) with `added_tokens_decoder` rewritten for the new vocabulary
  so transformers loads it, the donor's special_tokens_map.json and chat template. No tokenizer.model (it
  would disagree with the new vocabulary). Unlike mergekit (§4.5), the donor's generation_config.json is
  kept: the base's token ids keep their ids in every output vocabulary, and dropping it loses e.g.
  Llama 3's list of end-of-turn ids.
* Otherwise: the donor's files copied verbatim (§5.6).
Then `chat_template:` is applied. A failure to apply it is a warning; the merge still succeeds (§5.6).
"""

from __future__ import annotations

import json
from pathlib import Path

from mergebot.config.dense import MergeConfig
from mergebot.io import confine
from mergebot.io.local import TOKENIZER_FILES
from mergebot.io.output import copy_donor_files, write_json
from mergebot.tokenizer.chat_templates import apply_template, resolve_template
from mergebot.tokenizer.vocab import OutputVocab

KEEP_FROM_DONOR = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def added_tokens_decoder(tok) -> dict[str, dict]:
    out = {}
    for idx, t in sorted(tok.get_added_tokens_decoder().items()):
        out[str(idx)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
    return out


def write_built_tokenizer(ov: OutputVocab, work: Path) -> list[str]:
    ov.tokenizer.save(str(work / "tokenizer.json"))
    written = ["tokenizer.json"]
    cfg: dict = confine.json_object(ov.donor_dir, "tokenizer_config.json", f"tokenizer donor {ov.donor_dir.name}") or {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    cfg["added_tokens_decoder"] = added_tokens_decoder(ov.tokenizer)
    write_json(work / "tokenizer_config.json", cfg)
    written.append("tokenizer_config.json")
    for name in KEEP_FROM_DONOR:
        if confine.copy_file(ov.donor_dir, name, work / name, f"tokenizer donor {ov.donor_dir.name}"):
            written.append(name)
    return written


def write_tokenizer_files(cfg: MergeConfig, vocab: OutputVocab | None, donor_dir: Path, parents: list[Path],
                          work: Path, *, copy_tokenizer: bool = True) -> list[str]:
    """Write the output's tokenizer files; returns warnings."""
    warnings: list[str] = []
    if vocab is not None:
        write_built_tokenizer(vocab, work)
        copy_donor_files(donor_dir, work, only=("generation_config.json",), warnings=warnings)
    elif copy_tokenizer:
        copy_donor_files(donor_dir, work, warnings=warnings)
    else:
        copy_donor_files(donor_dir, work, only=("generation_config.json",), warnings=warnings)
        if cfg.chat_template is not None:
            warnings.append("chat_template: dropped, because --no-copy-tokenizer writes no tokenizer (§5.6)")
        return warnings
    if cfg.chat_template is None:
        return warnings
    try:
        template, note = resolve_template(cfg.chat_template, parents)
    except ValueError as e:
        return warnings + [f"chat_template: {e}; not applied"]
    if note:
        warnings.append(note)
    if template is None:
        return warnings
    if not (work / "tokenizer.json").is_file() and not (work / "tokenizer.model").is_file():
        return warnings + [(f"chat_template: the donor {donor_dir} has no tokenizer files, so the template was "
                            "not applied (the merge still succeeded)")]
    try:
        apply_template(work, template)
    except OSError as e:
        warnings.append(f"chat_template: could not be written: {e}")
    return warnings


# ------------------------------------------------------------------------------------------------ MoE (§3.6)

def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_token(directory: Path, name: str) -> str | None:
    """`bos_token` / `eos_token` text from tokenizer_config.json, else special_tokens_map.json."""
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        data = confine.json_object(directory, f, f"model {directory.name}")
        tok = _token_text(data.get(name)) if data is not None else None
        if tok:
            return tok
    return None


def tokenizer_identity(directory: Path) -> str | None:
    """The vocabulary of a tokenizer.json (model and added tokens), to tell whether two tokenizers are one."""
    data = confine.json_object(directory, "tokenizer.json", f"model {directory.name}")
    if data is None:
        return None
    return json.dumps([data.get("model"), data.get("added_tokens")], sort_keys=True)


def write_moe_tokenizer(base: Path, donor: Path, work: Path, copy: bool) -> list[str]:
    """A MoE's (§3.6): generation_config.json from the base; the donor's tokenizer files, with the pad token set to bos (eos if
    none) as mergekit saves it."""
    copied = copy_donor_files(base, work, only=("generation_config.json",))
    if not copy:
        return copied
    copied += copy_donor_files(donor, work, only=TOKENIZER_FILES)
    pad = special_token(donor, "bos_token") or special_token(donor, "eos_token")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = work / name
        if pad and f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):
                continue
            if isinstance(data, dict):
                data["pad_token"] = pad
                write_json(f, data)
    return copied
