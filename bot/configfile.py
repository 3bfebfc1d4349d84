"""One entry point for a config file of either kind: a merge (mergekit-yaml) or a MoE (mergekit-moe)."""

from __future__ import annotations

from pathlib import Path

from .config import MergeConfig, parse_config
from .errors import ConfigError
from .moe_config import MoeConfig, parse_moe
from .yamlsafe import load_yaml


def load(path: str | Path) -> MergeConfig | MoeConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, None, f"cannot read: {e}") from None
    doc = load_yaml(text, str(path))
    if isinstance(doc.data, dict) and "experts" in doc.data:
        return parse_moe(doc, text)
    return parse_config(text, str(path), doc)


def method_label(cfg: MergeConfig | MoeConfig) -> str:
    return f"moe ({cfg.gate_mode} gates)" if isinstance(cfg, MoeConfig) else cfg.method_name


def model_count(cfg: MergeConfig | MoeConfig) -> int:
    if isinstance(cfg, MoeConfig):
        return len({str(e.source_model) for e in cfg.experts} | {str(cfg.base_model)})
    return len(cfg.referenced_models())
