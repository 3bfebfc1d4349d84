"""Model card rendering: the dense seed configs, local parents, the MoE variant, user templates, provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from mergebot.card.licenses import LicensePolicy, analyze
from mergebot.card.render import (
    METHOD_INFO,
    CardError,
    _moe_details,
    card_context_from_output,
    render_card,
    write_card,
)
from mergebot.hub.parents import ParentInfo

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "merges"  # the seed configs, byte for byte
NO_GITHUB = {}  # card env without GITHUB_* variables

IMPACT = ("other", "ai2-impact-license-low-risk", "https://allenai.org/impact-license")


def sha(n: int) -> str:
    return f"{n:x}" * 40 if n < 16 else f"{n:040x}"


def hub_parent(ref: str, lic: str | None, langs: list[str], name: str | None = None, link: str | None = None,
               n: int = 1, **kw) -> ParentInfo:
    return ParentInfo(ref=ref, is_hub=True, revision="main", sha=sha(n), license=lic, license_name=name,
                      license_link=link, languages=langs, pipeline_tag="text-generation", **kw)


@dataclass
class Seed:
    config: str
    method: str
    base: str | None
    parents: list[ParentInfo]
    repo_id: str
    pretty: str
    url: str | None
    license: str
    languages: list[str]


SEEDS = {
    "000": Seed("000_linear.yml", "linear", None,
                [hub_parent("nvidia/Llama3-ChatQA-1.5-8B", "llama3", ["en"], n=1),
                 hub_parent("shenzhi-wang/Llama3-8B-Chinese-Chat", "llama3", ["en", "zh"], n=2)],
                "pravdin/Llama3-ChatQA-1.5-8B-Llama3-8B-Chinese-Chat-linear-merge",
                "Linear", "https://arxiv.org/abs/2203.05482", "llama3", ["en", "zh"]),
    "001": Seed("001_dare_ties_gradients.yml", "dare_ties", "tokyotech-llm/Swallow-70b-instruct-hf",
                [hub_parent("tokyotech-llm/Swallow-70b-instruct-hf", "llama2", ["en", "ja"], n=3),
                 hub_parent("allenai/tulu-2-dpo-70b", *IMPACT[:1], ["en"], name=IMPACT[1], link=IMPACT[2], n=4)],
                "nitky/Superswallow-70b-v0.1", "DARE TIES", "https://arxiv.org/abs/2311.03099", "other",
                ["en", "ja"]),
    "003": Seed("003_dare_ties_int8.yml", "dare_ties", "meta-llama/Meta-Llama-3-8B-Instruct",
                [hub_parent("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", ["en"], n=5, gated="manual"),
                 hub_parent("NousResearch/Hermes-2-Pro-Llama-3-8B", "llama3", ["en"], n=6),
                 hub_parent("aaditya/Llama3-OpenBioLLM-8B", "llama3", ["en"], n=7)],
                "o/Llama3-merge-biomed-8b", "DARE TIES", "https://arxiv.org/abs/2311.03099", "llama3", ["en"]),
    "004": Seed("004_slerp_gradients.yml", "slerp", "chihoonlee10/T3Q-DPO-Mistral-7B",
                [hub_parent("chihoonlee10/T3Q-DPO-Mistral-7B", "apache-2.0", [], n=8),
                 hub_parent("MatthieuJ/ING_2003M2_SLERP", "apache-2.0", [], n=9)],
                "MatthieuJ/ING_2003M3_SLERP", "SLERP", "https://en.wikipedia.org/wiki/Slerp", "apache-2.0", []),
}


def make_output(tmp: Path, config_text: str, parents: list[ParentInfo], *, method: str, base: str | None,
                kind: str = "merge", github: dict | None = None) -> Path:
    """A merge output directory as the engine writes it, minus the weights (the card does not read them)."""
    out = tmp / "out"
    out.mkdir(parents=True)
    (out / "mergekit_config.yml").write_text(config_text)
    (out / "config.json").write_text('{"model_type": "llama"}')
    lock = {
        "mergebot_version": "0.1.0", "config_sha256": "c0" * 32, "kind": kind, "merge_method": method,
        "base_model": base,
        "parents": [{"ref": p.ref, "revision": p.revision, "sha": p.sha, "local": not p.is_hub,
                     "role": p.role or ("base" if p.ref == base else ("expert" if kind == "moe" else "input"))}
                    for p in parents],
        "dtype": "bfloat16", "out_dtype": None, "random_seed": 42, "device": "cpu",
        "created": "2026-11-23T03:00:00Z",
    }
    if github:
        lock["github"] = github
    (out / "mergebot.lock.json").write_text(json.dumps(lock, indent=2))
    return out


def seed_card(tmp: Path, key: str, policy: LicensePolicy | None = None):
    policy = policy or LicensePolicy(allow_composite=True)
    seed = SEEDS[key]
    config_text = (CONFIGS / seed.config).read_text()
    out = make_output(tmp, config_text, seed.parents, method=seed.method, base=seed.base)
    report = analyze(seed.parents, repo_name=seed.repo_id.split("/")[1], policy=policy)
    ctx = card_context_from_output(out, seed.parents, report, seed.repo_id, env=NO_GITHUB)
    return seed, config_text, out, ctx, render_card(ctx)


@pytest.mark.parametrize("key", sorted(SEEDS))
def test_dense_seed_cards(tmp_path: Path, key: str) -> None:
    seed, config_text, out, ctx, text = seed_card(tmp_path, key)

    card = ModelCard(text)  # what huggingface_hub will parse on the Hub side
    data = card.data.to_dict()
    assert data["base_model"] == [p.ref for p in seed.parents]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["license"] == seed.license
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["merge", "mergekit", "mergebot"]
    assert data.get("language", []) == seed.languages
    if seed.license == "other":
        assert (data["license_name"], data["license_link"]) == ("composite", "NOTICE")
    else:
        assert "license_name" not in data and "license_link" not in data

    assert text.startswith("---\n") and f"# {seed.repo_id.split('/')[1]}\n" in text
    for p in seed.parents:  # each parent, linked, with its pinned sha
        assert f"[{p.ref}](https://huggingface.co/{p.ref})" in text
        assert f"[`{p.sha}`](https://huggingface.co/{p.ref}/tree/{p.sha})" in text
    assert f"[{seed.pretty}]({seed.url})" in text and f"(`{seed.method}`)" in text
    assert f"```yaml\n{config_text}```" in text  # verbatim, comments included
    assert "## License" in text and f"**{seed.license}**" in text
    assert "## How to use" in text and f'model_id = "{seed.repo_id}"' in text
    assert "## Provenance" in text and "mergebot 0.1.0 on 2026-11-23T03:00:00Z" in text
    assert "Workflow run" not in text  # no GitHub environment given
    assert len(card.text) >= 200  # Open LLM Leaderboard card-length check (doc §6)
    if seed.base:
        assert f"using [{seed.base}](https://huggingface.co/{seed.base}) as a base" in text


def test_seed_license_sections(tmp_path: Path) -> None:
    _, _, _, _, text000 = seed_card(tmp_path / "a", "000")
    assert "**Built with Meta Llama 3**" in text000
    assert "> Meta Llama 3 is licensed under the Meta Llama 3 Community License" in text000
    assert "License check: **ok**" in text000

    _, _, _, _, text001 = seed_card(tmp_path / "b", "001")
    assert "> Llama 2 is licensed under the LLAMA 2 Community License" in text001
    assert "AI2 ImpACT" in text001 and "may not be used to improve any large language model" in text001
    assert "License check: **warn**" in text001  # composite approved by the policy above

    _, _, _, _, text003 = seed_card(tmp_path / "c", "003")
    assert "is gated" in text003

    _, _, _, _, text004 = seed_card(tmp_path / "d", "004")
    assert "Built with" not in text004 and "Include a copy of the Apache License 2.0." in text004


def test_local_parents_are_left_out_of_base_model(tmp_path: Path) -> None:
    parents = [
        ParentInfo("./models/local-base", False, None, None, "apache-2.0", None, None, ["fr"], None, role="base"),
        hub_parent("org/hub-model", "apache-2.0", ["en"], n=3),
        hub_parent("org/hub-model", "apache-2.0", ["en"], n=3),  # a duplicate ref (self-merge) is listed once
    ]
    config = "models:\n  - model: ./models/local-base\n  - model: org/hub-model\nmerge_method: ties\n" \
             "base_model: ./models/local-base\n"
    out = make_output(tmp_path, config, parents[:2], method="ties", base="./models/local-base")
    report = analyze(parents)
    text = render_card(card_context_from_output(out, parents, report, None, env=NO_GITHUB))
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == ["org/hub-model"]
    assert data["language"] == ["fr", "en"]
    assert "`./models/local-base` (local)" in text
    assert "using `./models/local-base` as a base" in text
    assert "# out\n" in text  # no repo id: the output directory's name


def test_all_local_parents_omit_base_model_keys(tmp_path: Path) -> None:
    parents = [ParentInfo("./a", False, None, None, "mit", None, None, [], None),
               ParentInfo("./b", False, None, None, "mit", None, None, [], None)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB))
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert "language" not in data and data["license"] == "mit"


def test_moe_card_from_seed_002(tmp_path: Path) -> None:
    config_text = (CONFIGS / "002_moe_random.yml").read_text()
    parents = [
        ParentInfo("./ELYZA-japanese-Llama-2-13b-instruct", False, None, None, "llama2", None, None, ["ja"], None,
                   role="base"),
        ParentInfo("./ELYZA-japanese-Llama-2-13b", False, None, None, "llama2", None, None, ["ja"], None,
                   role="expert"),
    ]
    out = make_output(tmp_path, config_text, parents, method="moe", base="./ELYZA-japanese-Llama-2-13b-instruct",
                      kind="moe")
    report = analyze(parents, repo_name="ELYZA-japanese-Llama-2-MoE-2x13B-v0.1")
    ctx = card_context_from_output(out, parents, report, "Aratako/ELYZA-japanese-Llama-2-MoE-2x13B-v0.1",
                                   env=NO_GITHUB)
    text = render_card(ctx)
    data = ModelCard(text).data.to_dict()
    assert data["tags"] == ["merge", "mergekit", "mergebot", "moe"]
    assert "base_model" not in data  # every expert is local
    assert data["license"] == "llama2" and data["language"] == ["ja"]
    assert "Mixture of Experts" in text and "### Experts" in text and "gate mode `random`" in text
    assert "2 experts" in text and "2 active per token" in text
    assert "needs further training" in text
    assert f"```yaml\n{config_text}```" in text


def test_moe_card_with_hub_experts(tmp_path: Path) -> None:
    parents = [hub_parent("mistralai/Mistral-7B-v0.1", "apache-2.0", ["en"], n=1, role="base"),
               hub_parent("org/expert-a", "apache-2.0", ["en"], n=2, role="expert"),
               hub_parent("org/expert-b", "mit", ["de"], n=3, role="expert")]
    config = ("base_model: mistralai/Mistral-7B-v0.1\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n"
              "  - source_model: org/expert-a\n    positive_prompts: [code]\n"
              "  - source_model: org/expert-b\n    positive_prompts: [poems]\n")
    out = make_output(tmp_path, config, parents, method="moe", base="mistralai/Mistral-7B-v0.1", kind="moe")
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/moe-2x7b", env=NO_GITHUB))
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == ["mistralai/Mistral-7B-v0.1", "org/expert-a", "org/expert-b"]
    assert "moe" in data["tags"] and data["license"] == "apache-2.0"
    assert "1 active per token" in text and "needs further training" not in text


def test_write_card_writes_readme_and_notice_and_is_deterministic(tmp_path: Path) -> None:
    parents = [hub_parent("a/l3", "llama3", ["en"], n=1), hub_parent("b/l3", "llama3", ["en"], n=2)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    report = analyze(parents, repo_name="Llama3-twice")
    ctx = card_context_from_output(out, parents, report, "o/Llama3-twice", env=NO_GITHUB)
    readme = write_card(out, ctx)
    first = readme.read_text()
    assert readme == out / "README.md" and first == render_card(ctx)
    notice = (out / "NOTICE").read_text()
    assert "Meta Llama 3 is licensed under" in notice and f"a/l3@{sha(1)}" in notice
    write_card(out, card_context_from_output(out, parents, report, "o/Llama3-twice", env=NO_GITHUB))
    assert readme.read_text() == first


def test_github_provenance_links(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1), hub_parent("b/y", "mit", [], n=2)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    env = {"GITHUB_REPOSITORY": "acme/merges", "GITHUB_SHA": "f" * 40, "GITHUB_RUN_ID": "123456",
           "GITHUB_SERVER_URL": "https://github.example.com"}
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/x", env=env))
    assert "[acme/merges](https://github.example.com/acme/merges)" in text
    assert f"(https://github.example.com/acme/merges/commit/{'f' * 40})" in text
    assert "[123456](https://github.example.com/acme/merges/actions/runs/123456)" in text


def test_lock_github_block_wins_over_environment(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None,
                      github={"repository": "acme/merges", "sha": "a" * 40, "run_id": 7,
                              "server_url": "https://github.com"})
    env = {"GITHUB_REPOSITORY": "other/repo", "GITHUB_RUN_ID": "999"}
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/x", env=env))
    assert "https://github.com/acme/merges/actions/runs/7" in text and "other/repo" not in text


def test_user_template_can_extend_the_builtin_one(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    ctx = card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text('{% extends "card.md.j2" %}{% block usage %}\nAsk the team for access.\n{% endblock %}')
    text = render_card(ctx, tpl)
    assert "Ask the team for access." in text and "AutoModelForCausalLM" not in text
    assert ModelCard(text).data.to_dict()["license"] == "mit"


def test_user_template_errors_name_the_template(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    ctx = card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)
    undefined = tmp_path / "undefined.md.j2"
    undefined.write_text("---\n{{ front_matter }}---\n{{ ctx.no_such_field }}\n")
    with pytest.raises(CardError, match="undefined.md.j2"):
        render_card(ctx, undefined)
    bad_yaml = tmp_path / "bad.md.j2"
    bad_yaml.write_text("---\nlicense: [mit\n---\n# x\n")
    with pytest.raises(CardError, match="bad.md.j2"):
        render_card(ctx, bad_yaml)
    no_license = tmp_path / "nolicense.md.j2"
    no_license.write_text("---\ntags: [merge]\n---\n# x\n")
    with pytest.raises(CardError, match="no `license`"):
        render_card(ctx, no_license)
    with pytest.raises(CardError, match="not found"):
        render_card(ctx, tmp_path / "missing.j2")


def test_config_with_backticks_gets_a_longer_fence(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1)]
    config = "# note: ``` is not special here\nmerge_method: linear\n"
    out = make_output(tmp_path, config, parents, method="linear", base=None)
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB))
    assert f"````yaml\n{config}````" in text


def test_front_matter_round_trips_through_yaml(tmp_path: Path) -> None:
    parents = [hub_parent("a/q", "other", ["zh"], name="tongyi-qianwen", link="https://example.com/LICENSE", n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    ctx = card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)
    text = render_card(ctx)
    block = text.split("---\n")[1]
    assert yaml.safe_load(block) == ctx.front_matter()
    assert ctx.front_matter()["license_name"] == "tongyi-qianwen"


def test_method_table_agrees_with_the_engine() -> None:
    methods = pytest.importorskip("mergebot.engine.methods")
    for name, method in methods.METHODS.items():
        if name in METHOD_INFO:
            assert METHOD_INFO[name] == (method.pretty, method.url), name


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    (out / "mergekit_config.yml").unlink()
    with pytest.raises(CardError, match="mergekit_config.yml"):
        card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)


def test_refs_with_revision_are_linked_by_repo_id(tmp_path: Path) -> None:
    """The lock writes refs as the config does (`path@revision`); the Hub id drops the revision."""
    parents = [hub_parent("org/base@v1.0", "mit", [], n=1, role="base"), hub_parent("org/other", "mit", [], n=2)]
    out = make_output(tmp_path, "merge_method: ties\n", parents, method="ties", base="org/base@v1.0")
    text = render_card(card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB))
    assert ModelCard(text).data.base_model == ["org/base", "org/other"]
    assert "using [org/base@v1.0](https://huggingface.co/org/base) as a base" in text
    assert f"(https://huggingface.co/org/base/tree/{sha(1)})" in text


@pytest.mark.parametrize("text", [
    "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                                 for p, c in zip("abcdefgh", "bcdefghi")),  # alias bomb: 8^9 nodes
    "[" * 5000 + "]" * 5000,  # nesting past any recursion limit
])
def test_a_hostile_published_moe_config_is_one_card_error(text: str) -> None:
    # a card refresh reads mergekit_moe_config.yml back from the Hub: the bounded loader, one CardError line
    with pytest.raises(CardError) as e:
        _moe_details(text, "mergekit_moe_config.yml", 4)
    assert str(e.value).startswith("mergekit_moe_config.yml: ") and "\n" not in str(e.value)


def test_user_template_is_sandboxed_and_cannot_include_through_a_link(tmp_path: Path) -> None:
    """A template is a file anyone who can push may edit: it must not reach Python objects, nor read a file
    outside its directory through a symbolic link (Jinja2 refuses '..' by itself)."""
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    ctx = card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)
    escape = tmp_path / "escape.md.j2"
    escape.write_text('{% extends "card.md.j2" %}{% block usage %}{{ "".__class__.__mro__[1].__subclasses__() }}'
                      "{% endblock %}")
    with pytest.raises(CardError, match="escape.md.j2.*SecurityError"):
        render_card(ctx, escape)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOKEN=hf_secret\n")
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "notes.md").symlink_to(secret)
    linked = cards / "linked.md.j2"
    linked.write_text('{% extends "card.md.j2" %}{% block usage %}{% include "notes.md" %}{% endblock %}')
    with pytest.raises(CardError, match="linked.md.j2.*TemplateNotFound"):
        render_card(ctx, linked)
    (cards / "notes.md").unlink()
    (cards / "notes.md").write_text("Ask the team.\n")  # a plain file beside the template is fine
    assert "Ask the team." in render_card(ctx, linked)


def test_user_template_named_like_the_builtin_extends_the_builtin(tmp_path: Path) -> None:
    """A user's cards/card.md.j2 extending "card.md.j2" gets the built-in card (it recursed into itself); a
    template that is not UTF-8 text fails with its name."""
    parents = [hub_parent("a/x", "mit", [], n=1)]
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base=None)
    ctx = card_context_from_output(out, parents, analyze(parents), "o/x", env=NO_GITHUB)
    (tmp_path / "cards").mkdir()
    mine = tmp_path / "cards" / "card.md.j2"
    mine.write_text('{% extends "card.md.j2" %}{% block usage %}\nAsk the team.\n{% endblock %}')
    assert "Ask the team." in render_card(ctx, mine)
    mine.write_bytes(b"\xff\xfe{{ ctx }}")
    with pytest.raises(CardError, match="card.md.j2: cannot read the card template"):
        render_card(ctx, mine)


@pytest.mark.parametrize("front", [
    "license: mit\ntags: [merge]\n",
    "license: apache-2.0\nbase_model:\n- a/b\n- c/d\n",
    "tags: [merge]\n",  # no license
    "license: [mit\n",  # not YAML
    "- license\n- mit\n",  # not a mapping
    "",  # empty
    "license: mit\nmodel-index:\n- name: x\n  results:\n  - task: {type: t}\n    metrics: 3\n",  # bad eval results
    "license: mit\nmodel-index:\n- name: x\n  results:\n  - task: {type: text-generation}\n    dataset: {name: d, type: d}\n"
    "    metrics:\n    - {type: acc, value: 0.5}\n",
])
def test_metadata_check_agrees_with_the_hub_clients_model_card(tmp_path: Path, front: str) -> None:
    """The card check parses front matter with the Hub client's steps, not ModelCard itself (whose import loads
    the Hub API, ~0.2 s of every merge): it accepts and refuses what ModelCard(text) does (plus a license)."""
    from huggingface_hub import ModelCard

    from mergebot.card.render import _check_metadata
    text = f"---\n{front}---\n# card\n"
    try:
        license_ = ModelCard(text).data.to_dict().get("license")
        hub_error = None if license_ else "no `license`"
    except Exception as e:
        hub_error = "invalid: " + type(e).__name__
    try:
        _check_metadata(text, tmp_path / "t.md.j2")
        ours = None
    except CardError as e:
        ours = str(e)
    assert (ours is None) == (hub_error is None), (ours, hub_error)
    if ours is not None:
        assert ours.startswith(f"{tmp_path / 't.md.j2'}: ") and "\n" not in ours
        assert ("no `license`" in ours) == (hub_error == "no `license`"), (ours, hub_error)


def test_a_parents_hostile_metadata_is_one_plain_line_in_the_card(tmp_path: Path) -> None:
    """A parent's card is a stranger's file: its license, license_name and license_link are quoted in our card and
    NOTICE. Line breaks there wrote headings and links of the stranger's choosing into our card, an ESC byte went
    through raw, and a mapping as `pipeline_tag` became our card's pipeline_tag."""
    from mergebot.hub.parents import parent_from_local

    hostile = tmp_path / "models" / "hostile"
    hostile.mkdir(parents=True)
    (hostile / "README.md").write_text(
        '---\nlicense: "mit\\n\\n# Injected heading\\n[click](https://evil.example)"\n'
        'license_name: "x\\u001b[2Jy"\nlicense_link: {href: "javascript:alert(1)"}\n'
        "pipeline_tag: {x: 1}\nlanguage: [\"en\\n# lang\"]\n---\n")
    (tmp_path / "models" / "fine").mkdir()
    parents = [parent_from_local(hostile, ref="./models/hostile", role="base"),
               parent_from_local(tmp_path / "models" / "fine", ref="./models/fine", role="input")]
    assert parents[0].license_link is None and parents[0].pipeline_tag is None
    out = make_output(tmp_path, "merge_method: linear\n", parents, method="linear", base="./models/hostile")
    report = analyze(parents, policy=LicensePolicy(allow_unknown=True))
    ctx = card_context_from_output(out, parents, report, "o/x", env=NO_GITHUB)
    write_card(out, ctx)
    for name in ("README.md", "NOTICE"):
        text = (out / name).read_text()
        assert "\x1b" not in text, name
        assert not [line for line in text.splitlines() if line.startswith(("# Injected", "[click]", "# lang"))], name
    data = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert data["pipeline_tag"] == "text-generation" and "javascript" not in (out / "README.md").read_text()
