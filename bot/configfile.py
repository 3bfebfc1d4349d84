"""One entry point for a config file of either kind: a merge (mergekit-yaml) or a MoE (mergekit-moe)."""

from __future__ import annotations

from pathlib import Path

from .config import MergeConfig, parse_config
from .errors import ConfigError
from .moe_config import MoeConfig, parse_moe
from .multimerge import MultiConfig, parse_multi
from .yamlsafe import YamlDoc, load_yaml_all

AnyConfig = MergeConfig | MoeConfig | MultiConfig


def load(path: str | Path) -> AnyConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, None, f"cannot read: {e}") from None
    docs = load_yaml_all(text, str(path))
    if len(docs) > 1:  # mergekit-multi (§5.7)
        return parse_multi(docs, text, str(path))
    doc = docs[0] if docs else YamlDoc(None, str(path), {})
    if isinstance(doc.data, dict) and "experts" in doc.data:
        return parse_moe(doc, text)
    return parse_config(text, str(path), doc)


def method_label(cfg: AnyConfig) -> str:
    if isinstance(cfg, MultiConfig):
        return (f"{len(cfg.stages)} merges (" + " -> ".join(f"{s.name or 'result'}: {method_label(s.cfg)}"
                                                          for s in cfg.stages) + ")")
    return f"moe ({cfg.gate_mode} gates)" if isinstance(cfg, MoeConfig) else cfg.method_name


def model_count(cfg: AnyConfig) -> int:
    if isinstance(cfg, MultiConfig):
        return len(cfg.referenced_models())
    if isinstance(cfg, MoeConfig):
        return len({str(e.source_model) for e in cfg.experts} | {str(cfg.base_model)})
    return len(cfg.referenced_models())
