"""One entry point for a config file of any kind: a merge (mergekit-yaml), a MoE (mergekit-moe) or several
merges separated by `---` (mergekit-multi). Total on any bytes: a config or one ConfigError line (mergebot.config.yamlsafe)."""

from __future__ import annotations

from pathlib import Path

from mergebot.config.dense import MergeConfig, parse_config
from mergebot.errors import ConfigError, MergebotError
from mergebot.config.moe import MoeConfig, parse_moe
from mergebot.config.multi import MultiConfig, parse_multi
from mergebot.config.yamlsafe import YamlDoc, load_file, oneline

AnyConfig = MergeConfig | MoeConfig | MultiConfig


def load(path: str | Path) -> AnyConfig:
    """Read, parse and validate a config file (no models, no network)."""
    try:
        return _load(path)
    except MergebotError:
        raise
    except RecursionError:
        raise ConfigError(str(path), None, None, "nested too deeply to validate") from None
    except MemoryError:
        raise ConfigError(str(path), None, None, "too large to validate") from None
    except Exception as e:  # a validation bug must still be one line for a stranger's config (the Action)
        raise ConfigError(str(path), None, None, oneline(f"internal error while validating ({type(e).__name__}: "
                                                         f"{e}); please report this config")) from None


def _load(path: str | Path) -> AnyConfig:
    text, docs = load_file(path)
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
