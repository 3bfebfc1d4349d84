"""Parents on the Hub: a model's or an adapter's files at a revision pinned to its commit sha, or only the
safetensors headers a dry run needs (HTTP range requests, no tensor data).

`resolve` is where every model reference is found: its local directory when it names one (mergebot.io.local),
else the Hub repo, downloading only what a merge needs (safetensors shards + index, or `.bin` when there are no
safetensors; json and tokenizer files; license files). The resolved sha goes into the card and the lock file
(merge-semantics.md §1.1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import MergebotError, ModelError
from mergebot.hub import errors
from mergebot.hub.client import client, resolve_endpoint
from mergebot.io import confine
from mergebot.io.local import ResolvedModel, is_local, local_model, read_json_object
from mergebot.io.lora import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    LoraWeights,
    adapter_config,
    adapter_tensors,
)
from mergebot.io.reader import TensorReader
from mergebot.io.safetensors import (
    ST_INDEX,
    ST_SINGLE,
    HeaderEntry,
    one_line,
    parse_safetensors_header,
    read_weight_map,
)
from mergebot.io.weights import ModelWeights

_HUB_FIRST = 100_000  # bytes asked for in the first range request: most headers fit, one round trip
MODEL_FILES = ["*.json", "tokenizer.model", "merges.txt", "*.jinja", "LICENSE*", "LICENCE*", "USE_POLICY*", "NOTICE*"]
HEADER_FILES = ["*.json", "*.jinja", "tokenizer.model"]  # a dry run: everything but the weights


def resolve(ref: ModelRef, search: list[Path] | None = None, *, download: bool = True,
            token: str | None = None, stream: bool = False) -> ResolvedModel:
    """Find a model's files; for Hub models pin the revision to a commit sha and download what is needed.
    `stream`: the weights stay on the Hub, read later by range (mergebot.hub.stream): only the small files
    (json, tokenizer, licenses) come down, and a repo without safetensors is refused."""
    local = is_local(ref, search or [])
    if local is not None:
        return local_model(ref, local)
    if not is_repo_id(ref.path):
        raise ModelError(f"{ref}: no such local directory, and not a Hugging Face repo id")
    info = model_info(ref, str(ref), "model", token)
    names = [s.rfilename for s in (info.siblings or [])]
    safetensors = any(n.endswith(".safetensors") for n in names)
    if stream and not safetensors:
        from mergebot.hub.stream import StreamRefused
        raise StreamRefused(f"{ref}: --stream reads safetensors by range; this repo has only .bin weights "
                            "(merge without --stream)")
    weights = ["*.safetensors", "*.safetensors.index.json"] if safetensors else ["*.bin", "*.bin.index.json"]
    patterns = MODEL_FILES if stream else weights + MODEL_FILES if download else HEADER_FILES
    d = download_snapshot(ref, str(ref), info.sha, patterns, token)
    confine.audit(d, str(ref))
    return ResolvedModel(ref, d, True, info.sha, read_json_object(d, "config.json", str(ref)))


def resolve_adapter(ref: ModelRef, search: list[Path] | None = None, *, download: bool = True,
                    token: str | None = None) -> ResolvedModel:
    """Find a PEFT adapter: a local directory, or a Hub repo pinned to a commit sha (only the adapter files).

    `ResolvedModel.config` holds adapter_config.json (adapters have no config.json, which `resolve` requires,
    hence this sibling of it)."""
    local = is_local(ref, search or [])
    if local is not None:
        if ref.revision:
            raise ModelError(f"LoRA {ref}: a revision (@{ref.revision}) only applies to Hub repos; "
                             f"{local} is a local directory")
        return ResolvedModel(ref, local, False, None, adapter_config(local, ref))
    if not is_repo_id(ref.path):
        raise ModelError(f"LoRA {ref}: no such local directory, and not a Hugging Face repo id")
    info = model_info(ref, f"LoRA {ref}", "repo", token)
    names = {s.rfilename for s in (info.siblings or [])}
    if ADAPTER_CONFIG not in names:
        raise ModelError(f"LoRA {ref}: the Hub repo has no {ADAPTER_CONFIG}: not a PEFT adapter")
    if ADAPTER_SAFETENSORS not in names and ADAPTER_BIN not in names:
        raise ModelError(f"LoRA {ref}: the Hub repo has no {ADAPTER_SAFETENSORS} (or {ADAPTER_BIN})")
    patterns = [ADAPTER_CONFIG]
    if download:
        patterns.append(ADAPTER_SAFETENSORS if ADAPTER_SAFETENSORS in names else ADAPTER_BIN)
    d = download_snapshot(ref, f"LoRA {ref}", info.sha, patterns, token)
    return ResolvedModel(ref, d, True, info.sha, adapter_config(d, ref))


def model_info(ref: ModelRef, who: str, noun: str, token: str | None) -> Any:
    """The Hub's model info at the pinned revision; a known failure becomes one line naming `who`."""
    try:
        return client(token=token).model_info(ref.path, revision=ref.revision, files_metadata=False)
    except Exception as e:
        msg = errors.message("fetch", e, who=who, noun=noun, revision=ref.revision)
        if msg is None:
            raise
        raise ModelError(msg) from None


def download_snapshot(ref: ModelRef, who: str, sha: str | None, patterns: list[str], token: str | None) -> Path:
    """The files matching `patterns` at commit `sha`, in the HF cache; a known failure becomes one line."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.path, revision=sha, allow_patterns=patterns, token=token,
                                      endpoint=resolve_endpoint()))
    except Exception as e:
        msg = errors.message("download", e, who=who)
        if msg is None:
            raise
        raise ModelError(msg) from None


# ------------------------------------------------------------------------------------------- readers

def weights(ref: ModelRef, resolved: ResolvedModel, search: list[Path], *, headers_only: bool = False,
            token: str | None = None) -> TensorReader:
    """The tensors of a resolved model (names and shapes only from the Hub's headers for a dry run of a Hub
    model), with its `+lora` adapter folded in (mergebot.io.lora, §1.1)."""
    reader: TensorReader
    if resolved.is_hub and headers_only:
        reader = hub_headers(ref.path, resolved.sha or "main", str(ref), token)
    else:
        reader = ModelWeights(resolved.directory, str(ref))
    if ref.lora is None:
        return reader
    adapter = resolve_adapter(ref.lora, search, download=not headers_only, token=token)
    if adapter.is_hub and headers_only:  # dry run: the header via HTTP range requests, no tensor data
        tensors = ModelWeights(adapter.directory, f"LoRA {adapter.ref}", discover=False)
        add_hub_safetensors(tensors, adapter.ref.path, ADAPTER_SAFETENSORS, adapter.sha, token)
    else:
        tensors = adapter_tensors(adapter)
    return LoraWeights(reader, adapter, tensors, resolved.config)


def hub_headers(repo_id: str, sha: str, label: str, token: str | None = None) -> ModelWeights:
    """Names, dtypes and shapes read from the safetensors headers on the Hub (HTTP range requests),
    without downloading any tensor data: what `--dry-run` needs."""
    from huggingface_hub import hf_hub_download

    api = client(token=token)
    try:
        if api.file_exists(repo_id, ST_SINGLE, revision=sha):
            files = [ST_SINGLE]
        elif api.file_exists(repo_id, ST_INDEX, revision=sha):
            index = Path(hf_hub_download(repo_id, ST_INDEX, revision=sha, token=token, endpoint=resolve_endpoint()))
            files = list(dict.fromkeys(read_weight_map(index.parent, ST_INDEX, label).values()))
        else:
            raise ModelError(f"{label}: no {ST_SINGLE} or {ST_INDEX} on the Hub (a dry run reads "
                             "safetensors headers only)")
    except MergebotError:
        raise
    except Exception as e:  # noqa: BLE001 - any network or HTTP failure: we cannot read the headers
        raise ModelError(f"{label}: cannot read safetensors headers from the Hub: {type(e).__name__}: "
                         f"{one_line(e)}") from None
    w = ModelWeights(Path(repo_id), label, discover=False)
    for file in files:
        add_hub_safetensors(w, repo_id, file, sha, token)
    return w


def add_hub_safetensors(w: ModelWeights, repo_id: str, filename: str, revision: str | None,
                        token: str | None = None) -> None:
    """The tensors a Hub file's header declares (validated; names and shapes only, nothing mapped)."""
    entries, start = hub_safetensors_header(repo_id, filename, revision, f"{w.label}: {filename}", token)
    w.add_entries(entries, Path(filename), start, filename)


def hub_safetensors_header(repo_id: str, filename: str, revision: str | None, where: str,
                           token: str | None = None, endpoint: str | None = None) -> tuple[list[HeaderEntry], int]:
    """A Hub file's header by HTTP range requests (no tensor data), validated by `parse_safetensors_header`
    against the file size the server reports (Content-Range)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=resolve_endpoint(endpoint))
    headers = build_hf_headers(token=token)

    def get(first: int, last: int) -> tuple[bytes, int]:
        try:
            r = get_session().get(url, headers={**headers, "range": f"bytes={first}-{last}"},
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(r)
        except MergebotError:
            raise
        except Exception as e:  # noqa: BLE001 - any network or HTTP failure: we cannot read the header
            raise ModelError(f"{where}: cannot read the header from the Hub: {type(e).__name__}: "
                             f"{one_line(e)}") from None
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", "").strip())
        if r.status_code != 206 or m is None or int(m[1]) != first:
            raise ModelError(f"{where}: the Hub did not answer a range request for the header")
        body, total = r.content, int(m[3])
        if len(body) != int(m[2]) - first + 1 or int(m[2]) >= total:
            raise ModelError(f"{where}: the Hub's answer to a range request has the wrong length")
        return body, total

    head, size = get(0, _HUB_FIRST - 1)

    def read(offset: int, length: int) -> bytes:
        if offset + length <= len(head):
            return head[offset:offset + length]
        data, _ = get(offset, offset + length - 1)
        if len(data) != length:
            raise ModelError(f"{where}: the Hub's answer to a range request has the wrong length")
        return data

    return parse_safetensors_header(read, size, where)


