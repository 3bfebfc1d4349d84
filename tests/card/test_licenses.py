"""License analysis (hub-action-cards-licenses.md §5): one table row per parent combination."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mergebot.card.licenses import (
    LicenseInput,
    LicenseOverride,
    LicensePolicy,
    analyze,
    classify,
    lookup,
    render_notice,
)

LLAMA3_NOTICE = "Meta Llama 3 is licensed under the Meta Llama 3 Community License"
LLAMA2_NOTICE = "Llama 2 is licensed under the LLAMA 2 Community License"
LLAMA31_NOTICE = "Llama 3.1 is licensed under the Llama 3.1 Community License"
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use"
QWEN_NOTICE = "Qwen is licensed under the Qwen LICENSE AGREEMENT"
IMPACT = ("other", "ai2-impact-license-low-risk", "https://allenai.org/impact-license")


def P(ref: str, lic: str | None, name: str | None = None, link: str | None = None, **kw) -> LicenseInput:
    return LicenseInput(ref=ref, license=lic, license_name=name, license_link=link, **kw)


@dataclass
class Case:
    id: str
    parents: list[LicenseInput]
    license: str
    verdict: str
    codes: set[str] = field(default_factory=set)  # finding codes that must be present
    license_name: str | None = None
    license_link: str | None = None
    repo_name: str | None = None
    policy: LicensePolicy = LicensePolicy()
    obligations: list[str] = field(default_factory=list)  # substrings, each in some obligation
    built_with: list[str] = field(default_factory=list)  # exactly
    notices: list[str] | None = None  # notice-line prefixes, in order (None: not checked)
    absent_codes: set[str] = field(default_factory=set)


CASES = [
    # ---- the seeds' parents
    Case("seed000-llama3+llama3",
         [P("nvidia/Llama3-ChatQA-1.5-8B", "llama3"), P("shenzhi-wang/Llama3-8B-Chinese-Chat", "llama3")],
         "llama3", "ok", repo_name="Llama3-ChatQA-1.5-8B-Llama3-8B-Chinese-Chat-linear-merge",
         obligations=["Meta Llama 3 Community License", "Built with Meta Llama 3", 'name with "Llama 3"'],
         built_with=["Built with Meta Llama 3"], notices=[LLAMA3_NOTICE],
         absent_codes={"improve-other-llms", "naming"}),
    Case("seed001-llama2+ai2-impact",
         [P("tokyotech-llm/Swallow-70b-instruct-hf", "llama2"), P("allenai/tulu-2-dpo-70b", *IMPACT)],
         "other", "block", license_name="composite", license_link="NOTICE", repo_name="Superswallow",
         codes={"composite-license", "improve-other-llms", "license-warning"},
         obligations=["Llama 2 Community License", "Derivative Impact Report", "every parent license"],
         notices=[LLAMA2_NOTICE]),
    Case("seed001-composite-approved",
         [P("tokyotech-llm/Swallow-70b-instruct-hf", "llama2"), P("allenai/tulu-2-dpo-70b", *IMPACT)],
         "other", "warn", license_name="composite", policy=LicensePolicy(allow_composite=True),
         codes={"composite-license", "improve-other-llms", "license-warning"}, notices=[LLAMA2_NOTICE]),
    Case("seed003-llama3x3-gated-base",
         [P("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", gated="manual"),
          P("NousResearch/Hermes-2-Pro-Llama-3-8B", "llama3"), P("aaditya/Llama3-OpenBioLLM-8B", "llama3")],
         "llama3", "warn", repo_name="Llama3-merge-biomed-8b", codes={"gated-parent"},
         built_with=["Built with Meta Llama 3"], notices=[LLAMA3_NOTICE], absent_codes={"naming"}),
    Case("seed003-llama3x3",
         [P("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"), P("NousResearch/Hermes-2-Pro-Llama-3-8B", "llama3"),
          P("aaditya/Llama3-OpenBioLLM-8B", "llama3")],
         "llama3", "ok", repo_name="Llama-3-merge-biomed-8b", built_with=["Built with Meta Llama 3"],
         notices=[LLAMA3_NOTICE]),
    Case("seed004-apache+apache",
         [P("chihoonlee10/T3Q-DPO-Mistral-7B", "apache-2.0"), P("MatthieuJ/ING_2003M2_SLERP", "apache-2.0")],
         "apache-2.0", "ok", repo_name="ING_2003M3_SLERP", obligations=["Apache License 2.0"], notices=[]),
    # ---- other combinations
    Case("nc+apache", [P("a/nc", "cc-by-nc-4.0"), P("b/ap", "apache-2.0")],
         "cc-by-nc-4.0", "warn", codes={"non-commercial"}, obligations=["Non-commercial use only."]),
    Case("no-derivatives", [P("a/nd", "cc-by-nd-4.0"), P("b/ap", "apache-2.0")],
         "apache-2.0", "block", codes={"no-derivatives"}),
    Case("nc-nd", [P("a/ncnd", "cc-by-nc-nd-4.0"), P("b/ap", "apache-2.0")],
         "apache-2.0", "block", codes={"no-derivatives", "non-commercial"}),
    Case("gemma+llama3.1-named", [P("google/gemma-2-9b", "gemma"), P("meta-llama/Llama-3.1-8B", "llama3.1")],
         "other", "block", license_name="composite", repo_name="Llama-3.1-gemma-mix", codes={"composite-license"},
         built_with=["Built with Llama"], notices=[GEMMA_NOTICE, LLAMA31_NOTICE], absent_codes={"naming"},
         obligations=["Gemma Terms of Use", "Llama 3.1 Community License"]),
    Case("gemma+llama3.1-misnamed", [P("google/gemma-2-9b", "gemma"), P("meta-llama/Llama-3.1-8B", "llama3.1")],
         "other", "block", license_name="composite", repo_name="gemma-llama-mix",
         policy=LicensePolicy(allow_composite=True), codes={"composite-license", "naming"}),
    Case("unknown-missing", [P("a/nolicense", None), P("b/ap", "apache-2.0")],
         "apache-2.0", "block", codes={"unknown-license"}),
    Case("unknown-allowed", [P("a/nolicense", None), P("b/ap", "apache-2.0")],
         "apache-2.0", "warn", codes={"unknown-license"}, policy=LicensePolicy(allow_unknown=True)),
    Case("unknown-reviewed", [P("a/weird", "other", "my-custom-license"), P("b/ap", "apache-2.0")],
         "apache-2.0", "warn", codes={"unknown-license"}, policy=LicensePolicy(reviewed_refs=frozenset({"a/weird"}))),
    Case("unknown-only", [P("a/x", "unknown")], "unknown", "block", codes={"unknown-license"}),
    Case("mit+apache", [P("a/mit", "mit"), P("b/ap", "apache-2.0")], "apache-2.0", "ok",
         codes={"mixed-permissive"}, obligations=["MIT permission notice", "Apache License 2.0"]),
    Case("cc-by-sa+cc-by-nc", [P("a/sa", "cc-by-sa-4.0"), P("b/nc", "cc-by-nc-4.0")],
         "cc-by-sa-4.0", "block", codes={"share-alike-non-commercial", "non-commercial"}),
    Case("cc-by-sa+apache", [P("a/sa", "cc-by-sa-4.0"), P("b/ap", "apache-2.0")], "cc-by-sa-4.0", "ok",
         obligations=["share-alike"]),
    Case("cc-by-sa+llama3", [P("a/sa", "cc-by-sa-4.0"), P("b/l3", "llama3")], "cc-by-sa-4.0", "block",
         codes={"share-alike-community"}),
    Case("gpl+cc-by-sa", [P("a/gpl", "gpl-3.0"), P("b/sa", "cc-by-sa-4.0")], "gpl-3.0", "block",
         codes={"share-alike-conflict"}),
    Case("nc-sa+nc", [P("a/ncsa", "cc-by-nc-sa-4.0"), P("b/nc", "cc-by-nc-4.0")], "cc-by-nc-sa-4.0", "warn",
         codes={"non-commercial"}, absent_codes={"share-alike-conflict"}),
    Case("qwen+llama3-community-pair",
         [P("Qwen/Qwen2.5-72B-Instruct", "other", "qwen", "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE"),
          P("meta-llama/Meta-Llama-3-70B-Instruct", "llama3")],
         "other", "block", license_name="composite", repo_name="Llama-3-qwen-mix",
         codes={"composite-license", "improve-other-llms"}, built_with=["Built with Qwen", "Built with Meta Llama 3"],
         notices=[QWEN_NOTICE, LLAMA3_NOTICE]),
    Case("qwen-same-slug-kept",
         [P("Qwen/Qwen-72B", "other", "tongyi-qianwen", "https://huggingface.co/Qwen/Qwen-72B/blob/main/LICENSE"),
          P("Qwen/Qwen-72B-Chat", "other", "tongyi-qianwen", "https://huggingface.co/Qwen/Qwen-72B/blob/main/LICENSE")],
         "other", "ok", license_name="tongyi-qianwen",
         license_link="https://huggingface.co/Qwen/Qwen-72B/blob/main/LICENSE", built_with=["Built with Qwen"]),
    Case("qwen-research+apache", [P("Qwen/Qwen2.5-3B", "other", "qwen-research"), P("b/ap", "apache-2.0")],
         "other", "warn", license_name="qwen-research", codes={"non-commercial"}),
    Case("llama3+mistral-improve-clause", [P("meta-llama/Meta-Llama-3-8B", "llama3"), P("mistralai/Mistral-7B", "apache-2.0")],
         "llama3", "block", repo_name="MyMerge-8B", codes={"improve-other-llms", "naming"}),
    Case("llama3.1+apache-named", [P("meta-llama/Llama-3.1-8B", "llama3.1"), P("b/ap", "apache-2.0")],
         "llama3.1", "ok", repo_name="Llama-3.1-SuperMerge", built_with=["Built with Llama"],
         absent_codes={"improve-other-llms"}),
    Case("llama2+llama2", [P("a/l2", "llama2"), P("b/l2", "llama2")], "llama2", "ok", notices=[LLAMA2_NOTICE]),
    Case("llama2+llama3-different-licenses", [P("a/l2", "llama2"), P("b/l3", "llama3")], "other", "block",
         license_name="composite", codes={"composite-license", "improve-other-llms"}),
    Case("license-from-tag", [P("a/tagged", None, tags=["license:mit"]), P("b/mit", "mit")], "mit", "ok"),
    Case("other-named-llama3", [P("meta-llama/Meta-Llama-3-8B", "other", "llama3", "LICENSE"), P("b/l3", "llama3")],
         "llama3", "ok", built_with=["Built with Meta Llama 3"], notices=[LLAMA3_NOTICE]),
    Case("openrail+apache", [P("a/rail", "openrail"), P("b/ap", "apache-2.0")], "openrail", "ok",
         obligations=["use-based restrictions"]),
    Case("impact+apache", [P("allenai/tulu", *IMPACT), P("b/ap", "apache-2.0")], "other", "warn",
         license_name="ai2-impact-license-low-risk", license_link="https://allenai.org/impact-license",
         codes={"license-warning"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_license_table(case: Case) -> None:
    report = analyze(case.parents, repo_name=case.repo_name, policy=case.policy)
    assert (report.license, report.verdict) == (case.license, case.verdict), report.reasons
    if case.license == "other" or case.license_name is not None:
        assert report.license_name == case.license_name
    if case.license_link is not None:
        assert report.license_link == case.license_link
    if case.license != "other":
        assert report.license_name is None and report.license_link is None
    assert case.codes <= report.codes(), (case.codes, report.findings)
    assert not (case.absent_codes & report.codes()), report.findings
    for text in case.obligations:
        assert any(text in o for o in report.obligations), (text, report.obligations)
    if case.built_with or case.verdict == "ok":
        assert report.built_with == case.built_with
    if case.notices is not None:
        assert len(report.notice_lines) == len(case.notices), report.notice_lines
        for line, text in zip(report.notice_lines, case.notices):
            assert line.startswith(text), (text, report.notice_lines)
    # every warn/block finding is a reason and vice versa; info findings are notes
    assert len(report.reasons) == sum(1 for f in report.findings if f.level != "info")
    assert report.overridden is False and report.computed_license == report.license


def test_seed000_without_name_lists_the_naming_rule_but_does_not_block() -> None:
    report = analyze([P("nvidia/Llama3-ChatQA-1.5-8B", "llama3"), P("shenzhi-wang/Llama3-8B-Chinese-Chat", "llama3")])
    assert report.verdict == "ok"
    assert any('Begin the model name with "Llama 3"' in o for o in report.obligations)


def test_override_changes_the_declared_license_not_the_obligations() -> None:
    parents = [P("a/l3", "llama3"), P("b/l3", "llama3")]
    report = analyze(parents, repo_name="Llama3-x", override=LicenseOverride("apache-2.0"))
    assert report.license == "apache-2.0" and report.overridden and report.computed_license == "llama3"
    assert report.verdict == "warn" and "override" in report.codes("warn")
    assert any("Built with Meta Llama 3" in o for o in report.obligations)
    assert report.notice_lines and report.built_with == ["Built with Meta Llama 3"]
    same = analyze(parents, repo_name="Llama3-x", override=LicenseOverride("llama3"))
    assert same.overridden and same.verdict == "ok"


def test_override_does_not_lift_a_block() -> None:
    report = analyze([P("a/nd", "cc-by-nd-4.0")], override=LicenseOverride("mit"))
    assert report.license == "mit" and report.verdict == "block"


def test_duplicate_parents_are_counted_once() -> None:
    report = analyze([P("a/x", "llama3"), P("a/x", "llama3"), P("b/y", "apache-2.0")], repo_name="Llama3-dup")
    assert [c.ref for c in report.parents] == ["a/x", "b/y"]
    assert sum(1 for f in report.findings if f.code == "improve-other-llms") == 1


def test_lookup_and_classify() -> None:
    assert lookup("Apache-2.0").key == "apache-2.0"
    assert lookup("other", "Tongyi-Qianwen").key == "qwen"
    assert lookup("other", None) is None and lookup("unknown") is None and lookup("not-a-license") is None
    assert lookup(["mit"]).key == "mit" and lookup(["mit", "apache-2.0"]) is None
    c = classify(P("a/x", "other", "totally-new"))
    assert c.klass.value == "unknown" and c.label == "other (totally-new)"


def test_empty_parent_list_is_an_error() -> None:
    with pytest.raises(ValueError):
        analyze([])


def test_render_notice_lists_notices_and_every_parent() -> None:
    parents = [P("tokyotech-llm/Swallow-70b-instruct-hf", "llama2", sha="1" * 40),
               P("allenai/tulu-2-dpo-70b", *IMPACT, sha="2" * 40), P("./local", "llama2", is_hub=False)]
    report = analyze(parents, policy=LicensePolicy(allow_composite=True))
    text = render_notice(report, model_name="Superswallow")
    assert text.startswith("NOTICE for Superswallow\n")
    assert LLAMA2_NOTICE in text
    assert f"tokyotech-llm/Swallow-70b-instruct-hf@{'1' * 40}: llama2" in text
    assert "allenai/tulu-2-dpo-70b@" in text and "https://allenai.org/impact-license" in text
    assert "./local (local)" in text
    assert "Declared license of the merge: other (composite)" in text
