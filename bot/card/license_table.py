"""The licenses mergebot knows (hub-action-cards-licenses.md §5.1, §5.2): per Hub license id (or the
`license_name` slug of a known `license: other` license), its class, its link and what a derivative must carry.
The analysis of a merge's parents (mergebot.card.licenses) reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LicenseClass(str, Enum):  # noqa: UP042 (str() of a member must stay its qualified name)
    """The classes of doc §5.3 rule 2."""

    PERMISSIVE = "permissive"
    SHARE_ALIKE = "share-alike"
    COMMUNITY = "community"
    NON_COMMERCIAL = "non-commercial"
    NO_DERIVATIVES = "no-derivatives"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LicenseSpec:
    """What the bot knows about one license: how it classifies and what a derivative must carry."""

    key: str  # Hub id, or the `license_name` slug of a known `license: other` license
    title: str
    klass: LicenseClass
    hub_id: str  # value of `license:` in the card ("other" for licenses without a Hub id)
    link: str | None = None
    commercial: bool = True
    share_alike: bool = False
    family: str | None = None  # Llama family for the naming rule and the "improve other LLMs" clause
    notice: str | None = None  # exact notice string the license asks for
    built_with: str | None = None  # attribution line the license asks for
    name_rule: str | None = None  # regex the model name must match (case-insensitive)
    name_rule_text: str | None = None
    improve_clause: bool = False  # may not be used to improve LLMs outside its family
    obligations: tuple[str, ...] = ()
    warning: str | None = None  # always raised when a parent carries this license
    rank: int = 0  # permissive licenses: the higher, the more a derivative must carry

    @property
    def license_name(self) -> str | None:
        return self.key if self.hub_id == "other" else None



# --------------------------------------------------------------------------------------------------------------
# The table. Obligations summarise doc §5.2; links point at the originals.

_LLAMA_COMMON = (
    "Monthly active users above 700 million need a separate license from Meta.",
    "Follow Meta's Acceptable Use Policy and pass it on to users.",
)


def _llama3x(version: str, link: str) -> LicenseSpec:
    key = "llama" + version.replace(" ", "")
    return LicenseSpec(
        key=key,
        title=f"Llama {version} Community License",
        klass=LicenseClass.COMMUNITY,
        hub_id=key,
        link=link,
        family="llama3.1+",
        notice=(f"Llama {version} is licensed under the Llama {version} Community License, "
                "Copyright © Meta Platforms, Inc. All Rights Reserved."),
        built_with="Built with Llama",
        name_rule=r"^llama",
        name_rule_text='the model name must begin with "Llama"',
        obligations=(f"Ship a copy of the Llama {version} Community License with the model.",
                     'Display "Built with Llama" on a related website, user interface, blog post or documentation.',
                     'Begin the model name with "Llama".') + _LLAMA_COMMON,
    )


_SPECS: list[LicenseSpec] = [
    LicenseSpec("apache-2.0", "Apache License 2.0", LicenseClass.PERMISSIVE, "apache-2.0",
                "https://www.apache.org/licenses/LICENSE-2.0", rank=3,
                obligations=("Include a copy of the Apache License 2.0.",
                             "State that the weights were modified (merged).",
                             "Keep any NOTICE file of the parents.")),
    LicenseSpec("mit", "MIT License", LicenseClass.PERMISSIVE, "mit", "https://opensource.org/license/mit", rank=1,
                obligations=("Keep the parents' copyright and MIT permission notice.",)),
    LicenseSpec("llama2", "Llama 2 Community License", LicenseClass.COMMUNITY, "llama2",
                "https://ai.meta.com/llama/license/", family="llama2",
                notice=("Llama 2 is licensed under the LLAMA 2 Community License, "
                        "Copyright (c) Meta Platforms, Inc. All Rights Reserved."),
                improve_clause=True,
                obligations=("Ship a copy of the Llama 2 Community License with the model.",
                             "Include the Llama 2 notice in a NOTICE file.") + _LLAMA_COMMON),
    LicenseSpec("llama3", "Meta Llama 3 Community License", LicenseClass.COMMUNITY, "llama3",
                "https://llama.meta.com/llama3/license/", family="llama3",
                notice=("Meta Llama 3 is licensed under the Meta Llama 3 Community License, "
                        "Copyright © Meta Platforms, Inc. All Rights Reserved."),
                built_with="Built with Meta Llama 3",
                name_rule=r"^llama[-_ ]?3", name_rule_text='the model name must begin with "Llama 3" (e.g. "Llama-3-…")',
                improve_clause=True,
                obligations=("Ship a copy of the Meta Llama 3 Community License with the model.",
                             'Display "Built with Meta Llama 3" on a related website, user interface, blog post '
                             "or documentation.",
                             'Begin the model name with "Llama 3".') + _LLAMA_COMMON),
    _llama3x("3.1", "https://llama.meta.com/llama3_1/license/"),
    _llama3x("3.2", "https://www.llama.com/llama3_2/license/"),
    _llama3x("3.3", "https://www.llama.com/llama3_3/license/"),
    LicenseSpec("llama4", "Llama 4 Community License", LicenseClass.COMMUNITY, "llama4",
                "https://www.llama.com/llama4/license/", family="llama3.1+",
                notice=("Llama 4 is licensed under the Llama 4 Community License, "
                        "Copyright © Meta Platforms, Inc. All Rights Reserved."),
                built_with="Built with Llama", name_rule=r"^llama",
                name_rule_text='the model name must begin with "Llama"',
                obligations=("Ship a copy of the Llama 4 Community License with the model.",
                             'Display "Built with Llama".', 'Begin the model name with "Llama".') + _LLAMA_COMMON),
    LicenseSpec("gemma", "Gemma Terms of Use", LicenseClass.COMMUNITY, "gemma", "https://ai.google.dev/gemma/terms",
                notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
                obligations=("Pass the Gemma use restrictions (Prohibited Use Policy, ToU §3.2) on to recipients as an "
                             "enforceable provision.",
                             "Give recipients a copy of the Gemma Terms of Use.",
                             "Mark modified files as modified (the merged weights).",
                             "Include the Gemma notice in a NOTICE file.")),
    LicenseSpec("qwen", "Qwen LICENSE AGREEMENT", LicenseClass.COMMUNITY, "other",
                "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
                notice=("Qwen is licensed under the Qwen LICENSE AGREEMENT, Copyright (c) Alibaba Cloud. "
                        "All Rights Reserved."),
                built_with="Built with Qwen",
                obligations=("Ship a copy of the Qwen LICENSE AGREEMENT with the model.",
                             "Mark modified files as modified (the merged weights).",
                             'Display "Built with Qwen" or "Improved using Qwen" in product documentation.',
                             "Monthly active users above 100 million need a separate license from Alibaba Cloud.")),
    LicenseSpec("qwen-research", "Qwen RESEARCH LICENSE AGREEMENT", LicenseClass.NON_COMMERCIAL, "other",
                "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE", commercial=False,
                notice=("Qwen is licensed under the Qwen RESEARCH LICENSE AGREEMENT, Copyright (c) Alibaba Cloud. "
                        "All Rights Reserved."),
                built_with="Built with Qwen",
                obligations=("Ship a copy of the Qwen RESEARCH LICENSE AGREEMENT with the model.",
                             "Non-commercial research use only.",
                             'Do not use "Qwen" as the primary name of the model (uncertain, newer versions).')),
    LicenseSpec("ai2-impact-license-low-risk", "AI2 ImpACT License – Low Risk Artifacts", LicenseClass.COMMUNITY,
                "other", "https://allenai.org/impact-license",
                obligations=("Pass the AI2 ImpACT (low risk) use restrictions on to recipients.",
                             "Publish a Derivative Impact Report as the ImpACT license asks of derivatives.",),
                warning=("is under the AI2 ImpACT license: its terms for derivative weights are uncertain (it does "
                         "not clearly cover merging parameters into other models); its use restrictions and "
                         "reporting duties may carry over")),
    LicenseSpec("ai2-impact-license-medium-risk", "AI2 ImpACT License – Medium Risk Artifacts",
                LicenseClass.COMMUNITY, "other", "https://allenai.org/impact-license",
                obligations=("Pass the AI2 ImpACT (medium risk) restrictions on; distribution needs AI2's terms.",),
                warning="is under the AI2 ImpACT medium-risk license: redistribution of derivatives is restricted"),
    LicenseSpec("ai2-impact-license-high-risk", "AI2 ImpACT License – High Risk Artifacts", LicenseClass.NON_COMMERCIAL,
                "other", "https://allenai.org/impact-license", commercial=False,
                warning="is under the AI2 ImpACT high-risk license: derivatives may not be redistributed freely"),
    LicenseSpec("cc-by-4.0", "CC BY 4.0", LicenseClass.PERMISSIVE, "cc-by-4.0",
                "https://creativecommons.org/licenses/by/4.0/", rank=2,
                obligations=("Credit the parents, link the license and indicate the changes (merged).",)),
    LicenseSpec("cc-by-sa-4.0", "CC BY-SA 4.0", LicenseClass.SHARE_ALIKE, "cc-by-sa-4.0",
                "https://creativecommons.org/licenses/by-sa/4.0/", share_alike=True,
                obligations=("Credit the parents, link the license and indicate the changes (merged).",
                             "Distribute the merge under CC BY-SA 4.0 (share-alike).")),
    LicenseSpec("cc-by-nc-4.0", "CC BY-NC 4.0", LicenseClass.NON_COMMERCIAL, "cc-by-nc-4.0",
                "https://creativecommons.org/licenses/by-nc/4.0/", commercial=False,
                obligations=("Credit the parents, link the license and indicate the changes (merged).",
                             "Non-commercial use only.")),
    LicenseSpec("cc-by-nc-sa-4.0", "CC BY-NC-SA 4.0", LicenseClass.NON_COMMERCIAL, "cc-by-nc-sa-4.0",
                "https://creativecommons.org/licenses/by-nc-sa/4.0/", commercial=False, share_alike=True,
                obligations=("Credit the parents, link the license and indicate the changes (merged).",
                             "Non-commercial use only.", "Distribute the merge under CC BY-NC-SA 4.0 (share-alike).")),
]

# Hub ids (doc §5.1) grouped by class; entries above win. Older CC versions behave like 4.0 for our purposes.
_PERMISSIVE_IDS = {
    "bsd": 1, "bsd-2-clause": 1, "bsd-3-clause": 1, "bsd-3-clause-clear": 1, "isc": 1, "zlib": 1, "ncsa": 1,
    "postgresql": 1, "bsl-1.0": 1, "afl-3.0": 1, "artistic-2.0": 1, "ecl-2.0": 3, "ms-pl": 1, "apple-ascl": 1,
    "cc0-1.0": 0, "unlicense": 0, "wtfpl": 0, "pddl": 0, "odc-by": 2, "etalab-2.0": 2, "lppl-1.3c": 1,
    "ofl-1.1": 1, "cdla-permissive-1.0": 1, "cdla-permissive-2.0": 1, "cc-by-2.0": 2, "cc-by-2.5": 2,
    "cc-by-3.0": 2,
}
_SHARE_ALIKE_IDS = {"cc-by-sa-3.0", "gpl", "gpl-2.0", "gpl-3.0", "agpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
                    "lgpl-lr", "mpl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1", "eupl-1.2", "osl-3.0", "gfdl", "odbl",
                    "cdla-sharing-1.0"}
_COMMUNITY_IDS = {"openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m",
                  "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "grok2-community", "openmdw-1.0", "openmdw-1.1"}
_NON_COMMERCIAL_IDS = {"cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0",
                       "fair-noncommercial-research-license", "apple-amlr", "deepfloyd-if-license", "h-research",
                       "intel-research", "c-uda"}
_NO_DERIVATIVES_IDS = {"cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0"}
_UNKNOWN_IDS = {"unknown", "other", "cc"}

# `license: other` + license_name slugs seen on the Hub (doc §5.1; the Qwen slugs are uncertain there).
_OTHER_ALIASES = {
    "tongyi-qianwen": "qwen", "qwen-license": "qwen", "qwen": "qwen",
    "qwen-research": "qwen-research", "qwen-research-license": "qwen-research",
    "tongyi-qianwen-research": "qwen-research",
    "ai2-impact-license-low-risk": "ai2-impact-license-low-risk",
    "ai2-impact-license-lr": "ai2-impact-license-low-risk",
    "ai2-impact-license-medium-risk": "ai2-impact-license-medium-risk",
    "ai2-impact-license-high-risk": "ai2-impact-license-high-risk",
    "mistral-research-license": "mrl", "mrl": "mrl", "mnpl": "mrl",
    "microsoft-research-license": "msrla", "msrla": "msrla", "msr-la": "msrla",
}
_EXTRA_OTHER = [
    LicenseSpec("mrl", "Mistral AI Research License", LicenseClass.NON_COMMERCIAL, "other",
                "https://mistral.ai/licenses/MRL-0.1.md", commercial=False,
                obligations=("Research and non-commercial use only.",)),
    LicenseSpec("msrla", "Microsoft Research License Agreement", LicenseClass.NON_COMMERCIAL, "other",
                None, commercial=False, obligations=("Research and non-commercial use only.",)),
]


def _build_table() -> dict[str, LicenseSpec]:
    table = {s.key: s for s in _SPECS + _EXTRA_OTHER}
    for key, rank in _PERMISSIVE_IDS.items():
        table.setdefault(key, LicenseSpec(key, key, LicenseClass.PERMISSIVE, key, rank=rank,
                                          obligations=(f"Keep the parents' {key} license and notices.",)))
    for key in _SHARE_ALIKE_IDS:
        table.setdefault(key, LicenseSpec(key, key, LicenseClass.SHARE_ALIKE, key, share_alike=True,
                                          obligations=(f"Distribute the merge under {key} (share-alike).",)))
    for key in _COMMUNITY_IDS:
        table.setdefault(key, LicenseSpec(key, key, LicenseClass.COMMUNITY, key,
                                          obligations=(f"Include the use-based restrictions of {key} in the "
                                                       "merge's license and pass them on to users.",)))
    for key in _NON_COMMERCIAL_IDS:
        share_alike = "-sa-" in key
        table.setdefault(key, LicenseSpec(key, key, LicenseClass.NON_COMMERCIAL, key, commercial=False,
                                          share_alike=share_alike,
                                          obligations=("Research / non-commercial use only.",)))
    for key in _NO_DERIVATIVES_IDS:
        table.setdefault(key, LicenseSpec(key, key, LicenseClass.NO_DERIVATIVES, key, commercial="-nc-" not in key))
    return table


LICENSES: dict[str, LicenseSpec] = _build_table()


def norm(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return None  # several licenses declared at once: we cannot tell which applies
        value = value[0]
    text = str(value).strip().lower()
    return text or None



def lookup(license_id: str | None, license_name: str | None = None) -> LicenseSpec | None:
    """The spec for a declared (license, license_name) pair, or None when the bot does not know it."""
    lic = norm(license_id)
    name = norm(license_name)
    if lic == "other" or (lic is None and name):
        if name is None:
            return None
        key = _OTHER_ALIASES.get(name, name)
        return LICENSES.get(key)  # e.g. `other` + `license_name: llama3` as early Llama 3 repos did
    if lic is None or lic in _UNKNOWN_IDS:
        return None
    return LICENSES.get(lic)

