"""One entry point for a config file of any kind: a merge (mergekit-yaml), a MoE (mergekit-moe) or several
merges separated by `---` (mergekit-multi). Total on any bytes: a config or one ConfigError line (mergebot.config.yamlsafe)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

from mergebot.config.dense import parse_config
from mergebot.config.moe import parse_moe
from mergebot.config.multi import parse_multi
from mergebot.config.refs import ModelRef
from mergebot.config.yamlsafe import YamlDoc, load_file, oneline
from mergebot.errors import ConfigError, MergebotError


class Config(Protocol):
    """What every config kind declares: a merge (dense.MergeConfig), a mergekit-moe (moe.MoeConfig) or a
    mergekit-multi file (multi.MultiConfig). Callers use these and never ask which kind they hold; a build
    (mergebot.builds) is chosen by `kind`."""

    kind: ClassVar[str]  # "merge" | "moe" | "multi"
    file: str
    text: str
    warnings: list[str]

    @property
    def doc(self) -> YamlDoc | None: ...  # the (result's) YAML document, for line numbers

    @property
    def hub_repo(self) -> str | None: ...

    @property
    def method_name(self) -> str: ...

    @property
    def base_model(self) -> ModelRef | None: ...

    @property
    def pending(self) -> list[str]: ...  # valid language the engine refuses for now

    @property
    def sha256(self) -> str: ...

    def referenced_models(self) -> list[ModelRef]: ...

    def label(self) -> str: ...  # the method, as `mergebot validate` names it

    def model_count(self) -> int: ...


def load(path: str | Path) -> Config:
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


def _load(path: str | Path) -> Config:
    text, docs = load_file(path)
    if len(docs) > 1:  # mergekit-multi (§5.7)
        return parse_multi(docs, text, str(path))
    doc = docs[0] if docs else YamlDoc(None, str(path), {})
    if isinstance(doc.data, dict) and "experts" in doc.data:
        return parse_moe(doc, text)
    return parse_config(text, str(path), doc)
