"""Which configs an event asks for, and the Hub repo each one publishes to.

Target naming: a config's own `hub_repo:` wins, else `<namespace input>/<file stem>`. Every config matching the
`configs` input is parsed (cheap: YAML only) so that two configs aiming at the same repo are caught even when
only one of them changed; problems of configs that were not selected are not reported.

Mode -> (which configs, publish?):
  auto      push: changed | pull_request: changed, never publish | schedule, workflow_dispatch, other: stale
  all       every matching config          changed   the event's changed configs (all when it has no range)
  stale     configs whose parents or config changed since the published lock (`force`: all of them)
  dry-run   what `auto` would pick, planned but not merged
A pull_request event never publishes, whatever the mode (no secrets there, and a PR is not yet the truth).

Configs are pushed by anyone, so a config file is read only when it is a regular file inside the workspace:
patterns that are absolute or climb with `..`, links that lead out, file names with control characters
(they would forge log lines) are refused as that entry's error, and symbolic links to directories are not
walked. One unreadable or hostile file (YAML nested thousands deep, binary garbage) is its entry's error.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mergebot.action.events import Event, changed_files
from mergebot.action.inputs import ActionInputs
from mergebot.action.runner_log import display_name, exception_message, has_control, one_line
from mergebot.config.configfile import Config, load
from mergebot.errors import ConfigError, MergebotError
from mergebot.io.confine import is_inside

_REPO_NAME = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


@dataclass
class ConfigEntry:
    """One config file: parsed config or the reason it cannot run, and its target repo."""

    path: str  # relative to the workspace, POSIX: what annotations and the summary show
    file: Path  # absolute
    cfg: Config | None = None
    repo: str | None = None
    error: str | None = None
    line: int | None = None  # YAML line of a config error, for the ::error annotation
    reason: str = ""  # why it was selected


@dataclass
class Selection:
    """The configs to consider for this run and what to do with them."""

    event: str
    mode: str  # the input, after `auto` was resolved: all | changed | stale | dry-run
    which: str  # all | changed | stale
    publish: bool
    skip_up_to_date: bool  # stale mode: configs whose lock matches are reported, not merged
    entries: list[ConfigEntry]
    notes: list[str] = field(default_factory=list)


def valid_repo_id(repo: str) -> bool:
    parts = repo.split("/")
    return len(parts) == 2 and all(_REPO_NAME.fullmatch(p) for p in parts)


def target_repo(cfg: Config, path: str, namespace: str | None) -> str:
    """`hub_repo:` from the config, else namespace/<file stem>; ConfigError-like ValueError when neither works."""
    if cfg.hub_repo:
        if not valid_repo_id(cfg.hub_repo):
            raise ValueError(f"hub_repo {cfg.hub_repo!r} is not a valid Hub repo id (owner/name; letters, digits, "
                             "'-', '_', '.'; at most 96 characters)")
        return cfg.hub_repo
    if not namespace:
        raise ValueError("no target repo: the config has no `hub_repo:` and the action's `namespace` input is empty")
    stem = Path(path).stem
    repo = f"{namespace}/{stem}"
    if not valid_repo_id(repo):
        raise ValueError(f"the file name {stem!r} is not a valid Hub repo name; rename the file or set `hub_repo:`")
    return repo


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regex of a recursive glob (`**/` = any directories, `*` and `?` stay within one segment), to match
    paths that no longer exist (deleted configs) against the `configs` input."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


MAX_CONFIG_BYTES = 1 << 20  # a merge config is a few KB; anything this big is not one
MAX_WALK = 100_000  # directory entries looked at per pattern, so a huge or hostile tree cannot stall a run


class PatternError(MergebotError):
    """A `configs` input pattern that would read outside the workspace, or cannot be walked."""


def _safe_pattern(pattern: str) -> str:
    """The pattern relative to the workspace; PatternError when it is absolute, climbs or holds controls."""
    p = pattern.strip()
    if has_control(p):
        raise PatternError(f"input configs: '{display_name(p)}' holds control characters")
    if p.startswith(("/", "~", "\\")) or ".." in Path(p).parts or re.match(r"[A-Za-z]:", p):
        raise PatternError(f"input configs: '{display_name(p)}' is outside the workspace: configs are read only "
                           "from paths and globs relative to the repository (no leading /, no ~, no ..)")
    return p.removeprefix("./")


def _valid_patterns(patterns: list[str]) -> list[str]:
    out = []
    for raw in patterns:
        try:
            out.append(_safe_pattern(raw))
        except PatternError:
            continue
    return out


def _literal_prefix(pattern: str) -> str:
    """The directories of `pattern` before its first segment with a wildcard (where the walk starts)."""
    parts = pattern.split("/")[:-1]
    lit: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        lit.append(part)
    return "/".join(p for p in lit if p and p != ".")


def _walk(workspace: Path, pattern: str) -> list[str]:
    """Workspace paths (POSIX, relative) matching a glob pattern, like `glob(recursive=True)` (hidden names
    only when the pattern names a hidden segment) but never following a symbolic link to a directory, so a
    link to `/` or a link loop inside `merges/` is not walked. Symlinked files are returned: `check_file`
    decides about them."""
    regex = glob_regex(pattern)
    hidden_ok = "/." in "/" + pattern
    prefix = _literal_prefix(pattern)
    top = workspace / prefix if prefix else workspace
    if not top.is_dir():
        return []
    if not is_inside(top.resolve(), workspace.resolve()):
        raise PatternError(f"input configs: '{display_name(pattern)}': {display_name(prefix)} leads outside the "
                           "workspace (a symbolic link)")
    depth = None if "**" in pattern else pattern.count("/")  # without `**`, no deeper than the pattern
    hits: list[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        seen += len(dirnames) + len(filenames)
        if seen > MAX_WALK:
            raise PatternError(f"input configs: '{display_name(pattern)}' walks more than {MAX_WALK} files; "
                               "narrow the pattern")
        rel = Path(dirpath).relative_to(workspace).as_posix()
        rel = "" if rel == "." else rel + "/"
        if depth is not None and rel.count("/") >= depth:
            dirnames.clear()
        dirnames[:] = sorted(d for d in dirnames if hidden_ok or not d.startswith("."))
        for name in filenames:
            if (hidden_ok or not name.startswith(".")) and regex.fullmatch(rel + name):
                hits.append(rel + name)
    return hits


def discover(workspace: Path, patterns: list[str]) -> tuple[list[str], list[ConfigEntry], list[str]]:
    """(matching config paths, entries for bad patterns and explicit paths that do not exist, notes for
    empty globs). A pattern that points outside the workspace is that pattern's error, not the run's."""
    found: dict[str, None] = {}
    missing: list[ConfigEntry] = []
    notes: list[str] = []
    for raw in patterns:
        try:
            pattern = _safe_pattern(raw)
            if glob.has_magic(pattern):
                hits = _walk(workspace, pattern)
            else:  # a link is listed (check_file refuses it if it leads out), a directory is not
                here = workspace / pattern
                hits = [pattern] if os.path.lexists(here) and not here.is_dir() else []
        except (PatternError, OSError) as e:
            missing.append(ConfigEntry(display_name(raw.strip()), workspace, error=one_line(e)))
            continue
        if not hits:
            if glob.has_magic(pattern):
                notes.append(f"input configs: {pattern!r} matches no file")
            else:
                missing.append(ConfigEntry(display_name(pattern), workspace / pattern,
                                           error="no such file (named in the `configs` input)"))
        for h in hits:
            found.setdefault(h, None)
    return sorted(found), missing, notes


# shell and expression metacharacters ($ ` ' " ; | & < > ( ) { } * ? ! \ #) never reach the outputs; nor blanks,
# commas or a leading `-`, which the `configs` input splits on or strips: `mergebot plan`'s matrix hands each
# config back through that input, where `merges/q,merges/b.yml` would name another config
UNSAFE_NAME = re.compile(r"[^\w./+@=-]|^-")


def check_file(workspace: Path, path: str) -> str | None:
    """Why the config file `path` (relative to the workspace) may not be read, or None.

    Refused: names with control characters or bytes that are not UTF-8 (they would forge log lines),
    absolute or climbing paths, links whose target is outside the workspace, anything not a regular file
    (a FIFO would block the run) and files far larger than a config. The message names the path as given,
    never where a link points nor what it holds."""
    shown = display_name(path)
    if has_control(path):
        return (f"{shown}: refusing this file name: it holds control characters or bytes that are not UTF-8; "
                "rename the file")
    if UNSAFE_NAME.search(path):
        return (f"{shown}: refusing this file name: use letters, digits and . _ - + @ = / only (names reach "
                "the `results` output, which workflows may paste into shell scripts, and the `configs` input)")
    if Path(path).is_absolute() or ".." in Path(path).parts:
        return f"{shown}: refusing it: configs are read only from inside the workspace"
    root = workspace.resolve()
    full = root / path
    if not is_inside(full.resolve(), root):
        return f"{shown}: refusing it: it is a symbolic link that leads outside the workspace"
    try:
        st = os.stat(full)
    except FileNotFoundError:
        return f"{shown}: no such file (a dangling symbolic link?)"
    except OSError as e:
        return f"{shown}: cannot read it ({type(e).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown}: refusing it: not a regular file"
    if st.st_size > MAX_CONFIG_BYTES:
        return f"{shown}: refusing it: {st.st_size} bytes is far more than a merge config ({MAX_CONFIG_BYTES} at most)"
    return None


def load_entry(workspace: Path, path: str, namespace: str | None) -> ConfigEntry:
    """Parse one config and name its target; every error (a hostile file can raise anything, RecursionError
    and MemoryError included) is kept on the entry, never raised."""
    refused = check_file(workspace, path)
    if refused is not None:
        return ConfigEntry(display_name(path), workspace / path, error=refused)
    try:
        return _load_entry(workspace, path, namespace)
    except Exception as e:  # noqa: BLE001 - one file must not stop the run
        return ConfigEntry(path, workspace / path, error=f"{path}: cannot load this config: {exception_message(e)}")


def _load_entry(workspace: Path, path: str, namespace: str | None) -> ConfigEntry:
    entry = ConfigEntry(path, workspace / path)
    try:
        entry.cfg = load(entry.file)
    except ConfigError as e:
        entry.error = str(ConfigError(path, e.key, e.line, e.reason))
        entry.line = e.line
        return entry
    except MergebotError as e:
        entry.error = str(e)
        return entry
    try:
        entry.repo = target_repo(entry.cfg, path, namespace)
    except ValueError as e:
        entry.error = f"{path}: {e}"
        doc = entry.cfg.doc
        entry.line = doc.line(("hub_repo",)) if doc is not None and entry.cfg.hub_repo else None
    return entry


def mark_duplicate_targets(entries: list[ConfigEntry]) -> None:
    """Two configs publishing to one repo would overwrite each other: both get an error naming the other."""
    by_repo: dict[str, list[ConfigEntry]] = {}
    for e in entries:
        if e.repo and e.error is None:
            by_repo.setdefault(e.repo.lower(), []).append(e)
    for group in by_repo.values():
        if len(group) < 2:
            continue
        for e in group:
            others = ", ".join(o.path for o in group if o is not e)
            e.error = (f"{e.path}: target repo {e.repo} is also the target of {others}; two configs cannot publish "
                       "to one repo (set a different `hub_repo:` or rename a file)")
            if e.cfg is not None and e.cfg.hub_repo:
                e.line = e.cfg.doc.line(("hub_repo",)) if e.cfg.doc is not None else None


def resolve_mode(event: Event, inputs: ActionInputs) -> tuple[str, str, bool, list[str]]:
    """(mode, which, publish, notes) for this event and these inputs."""
    notes: list[str] = []
    auto_which = {"push": "changed", "pull_request": "changed", "pull_request_target": "changed"}.get(event.name,
                                                                                                       "stale")
    mode = inputs.mode
    if mode == "auto":
        which, publish = auto_which, True
        mode = "changed" if auto_which == "changed" else "stale"
    elif mode == "dry-run":
        which, publish = auto_which, False
    else:
        which, publish = mode, True
    if event.is_pull_request:
        if publish:
            notes.append(f"{event.name}: dry run only (no secrets, nothing is published from a pull request)")
        publish, mode = False, "dry-run"
    if which == "stale" and inputs.force:
        which = "all"
        notes.append("force: every selected config is re-merged, up to date or not")
    return mode, which, publish, notes


def select(event: Event, inputs: ActionInputs) -> Selection:
    """The configs this run considers, parsed and named, with duplicate targets marked."""
    mode, which, publish, notes = resolve_mode(event, inputs)
    paths, missing, discover_notes = discover(event.workspace, inputs.configs)
    notes += discover_notes
    entries = {p: load_entry(event.workspace, p, inputs.namespace) for p in paths}
    mark_duplicate_targets(list(entries.values()))

    chosen: list[ConfigEntry]
    if which == "changed":
        changed = changed_files(event)
        notes += event.notes
        if changed is None:
            chosen = list(entries.values())
            reason = "all (no usable diff)"
        else:
            changed_set = set(changed)
            chosen = [entries[p] for p in paths if p in changed_set]
            reason = f"changed in this {event.name or 'range'}"
            valid = _valid_patterns(inputs.configs)
            gone = [p for p in changed if p not in entries and not os.path.lexists(event.workspace / p)
                    and any(glob_regex(g).fullmatch(p) for g in valid)]
            notes += [f"{p}: deleted; its Hub repo is left as it is" for p in gone]
    else:
        chosen = list(entries.values())
        reason = "scheduled staleness check" if which == "stale" else "all configs"
    for e in chosen:
        e.reason = reason
    for m in missing:
        m.reason = "named in the configs input"
    return Selection(event=event.name or "local", mode=mode, which=which, publish=publish,
                     skip_up_to_date=(which == "stale"), entries=missing + chosen, notes=notes)
