"""mergekit-multi files (merge-semantics.md §5.7): several merges in one YAML file, separated by `---`.

Each document is a merge (or a mergekit-moe) config; `name:` names its result, and a model reference equal to
an earlier document's name means that merge's output (an intermediate). The file's result is the one document
without a name, or, when every document is named, the one no other document uses. Intermediates are built
first, in dependency order (mergebot.builds.multi builds them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

from mergebot.config.dense import MergeConfig, parse_config
from mergebot.config.moe import MoeConfig, parse_moe
from mergebot.config.refs import ModelRef, unique
from mergebot.config.yamlsafe import YamlDoc, short
from mergebot.errors import ConfigError

NAME = "name"


@dataclass
class Stage:
    name: str | None
    cfg: MergeConfig | MoeConfig
    needs: list[str]  # names of the earlier stages this one reads


@dataclass
class MultiConfig:
    """The stages in build order; the file's result last. What the other kinds hold themselves (doc, hub_repo,
    method, base model) is the result stage's."""

    kind: ClassVar[str] = "multi"

    file: str
    text: str
    stages: list[Stage]
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def doc(self) -> YamlDoc | None:
        return self.final.cfg.doc

    @property
    def hub_repo(self) -> str | None:
        return self.final.cfg.hub_repo

    @property
    def method_name(self) -> str:
        return self.final.cfg.method_name

    @property
    def base_model(self) -> ModelRef | None:
        base = self.final.cfg.base_model
        return base if base is not None and base.path not in self.names else None

    @property
    def pending(self) -> list[str]:
        return [p for s in self.stages for p in s.cfg.pending]

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.stages if s.name}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def referenced_models(self) -> list[ModelRef]:
        """The leaf parents of every stage (intermediates excluded), in file order, deduplicated."""
        return unique(ref for s in self.stages for ref in s.cfg.referenced_models() if ref.path not in self.names)

    def label(self) -> str:
        return (f"{len(self.stages)} merges (" + " -> ".join(f"{s.name or 'result'}: {s.cfg.label()}"
                                                           for s in self.stages) + ")")

    def model_count(self) -> int:
        return len(self.referenced_models())


def parse_multi(docs: list[YamlDoc], text: str, file: str) -> MultiConfig:
    stages: list[Stage] = []
    by_name: dict[str, int] = {}
    for i, doc in enumerate(docs):
        data = doc.data
        if not isinstance(data, dict):
            raise doc.error((), f"document {i + 1} of this mergekit-multi file is not a mapping")
        name = data.get(NAME)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise doc.error((NAME,), f"expected a merge name (a string), got {short(name)}")
        if name is not None:
            _check_name(doc, name)
        if name in by_name:
            raise doc.error((NAME,), f"merge name {name!r} is already used by document {by_name[name] + 1} "
                            f"(line {docs[by_name[name]].line((NAME,))})")
        cfg = parse_moe(doc, text) if "experts" in data else parse_config(text, file, doc)
        stages.append(Stage(name, cfg, []))
        if name is not None:
            by_name[name] = i
    for stage in stages:
        stage.needs = [r.path for r in stage.cfg.referenced_models() if r.path in by_name]
        for ref in stage.cfg.referenced_models():
            if ref.path in by_name and (ref.revision or ref.lora):
                reason = f"{ref}: {ref.path!r} is a merge of this file; it has no revisions or adapters"
                where = stage.cfg.doc
                raise where.error((), reason) if where else ConfigError(stage.cfg.file, None, None, reason)
    unnamed = [i for i, s in enumerate(stages) if s.name is None]
    if len(unnamed) > 1:
        second = docs[unnamed[1]]
        raise second.error((), "more than one merge without a `name:` in this mergekit-multi file: name every "
                               "merge but the file's result (documents "
                               + ", ".join(str(i + 1) for i in unnamed) + ")")
    used = {n for s in stages for n in s.needs}
    if unnamed:
        final = unnamed[0]
    else:
        tops = [i for i, s in enumerate(stages) if s.name not in used]
        if len(tops) != 1:
            raise docs[0].error((), "a mergekit-multi file needs one result: leave the final merge without a "
                                    "`name:`, or make every other merge feed it (unused: "
                                    + ", ".join(repr(stages[i].name) for i in tops) + ")")
        final = tops[0]
    order = _build_order(stages, final, docs)
    warnings = [w for s in stages for w in s.cfg.warnings]
    unused = [s.name for i, s in enumerate(stages) if i not in order]
    if unused:
        warnings.append(f"{file}: merges {', '.join(map(repr, unused))} feed nothing and are not built")
    return MultiConfig(file, text, [stages[i] for i in order], warnings)


def _check_name(doc: YamlDoc, name: str) -> None:
    """A stage name becomes a directory under the scratch dir and a model reference: plain, relative, no `..`."""
    parts = name.replace("\\", "/").split("/")
    if len(name) > 200 or not name.isprintable() or name.startswith(("/", "~")) or ".." in parts or "." in parts \
            or "" in parts:
        raise doc.error((NAME,), f"merge name {short(name)} is not a plain name (printable, at most 200 characters, "
                                 "no leading '/', no empty, '.' or '..' parts)")


def _build_order(stages: list[Stage], final: int, docs: list[YamlDoc]) -> list[int]:
    """Depth-first from the result: each stage after everything it reads; a cycle is an error."""
    index = {s.name: i for i, s in enumerate(stages) if s.name}
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, chain: list[str]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "active":
            raise docs[i].error((NAME,), "merges reference each other in a cycle: "
                                + " -> ".join(chain + [str(stages[i].name)]))
        state[i] = "active"
        for need in stages[i].needs:
            visit(index[need], chain + [str(stages[i].name or "result")])
        state[i] = "done"
        order.append(i)

    visit(final, [])
    return order
