"""Which files of a parent count as what a merge read (weights changed → re-merge) and which as card inputs."""

from __future__ import annotations

from mergebot.hub.digests import changed_paths, merge_inputs, metadata_digest

NAMES = ["README.md", "LICENSE", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
         "tokenizer.model", "chat_template.jinja", "USE_POLICY.md", "original/consolidated.pth"]


def test_merge_inputs_follow_what_fetch_downloads():
    assert merge_inputs(NAMES) == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                   "tokenizer.json", "tokenizer.model", "chat_template.jinja"]
    assert "pytorch_model.bin" in merge_inputs(["config.json", "pytorch_model.bin", "README.md"])
    assert merge_inputs(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"],
                        adapter=True) == ["adapter_config.json", "adapter_model.safetensors"]


def test_metadata_digest_ignores_prose_fields_and_order():
    a = metadata_digest({"license": "mit", "language": ["en"], "model-index": [1]}, ["license:mit", "x"], False)
    b = metadata_digest({"language": ["en"], "license": "mit"}, ["y", "license:mit"], None)
    assert a == b
    assert a != metadata_digest({"license": "apache-2.0", "language": ["en"]}, ["license:mit"], False)
    assert a != metadata_digest({"license": "mit", "language": ["en"]}, ["license:mit"], "auto")


def test_changed_paths_sees_added_removed_and_modified():
    assert changed_paths({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]
    assert changed_paths({"a": "1"}, {}) == ["a"]
