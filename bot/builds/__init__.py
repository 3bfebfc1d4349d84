"""Builds: what turns a validated config into a finished output directory.

`build_for(config)` gives the build of any config kind: a dense merge (dense.DenseBuild), a mergekit-moe
(moe.write.MoeBuild) or a mergekit-multi file (multi.MultiBuild). Each is a `base.Build`: its models, its plan
before anything is written (`prepare`), and `run` into an output directory, giving back a `base.BuildResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergebot.builds.base import Build
from mergebot.builds.multi import STAGE_BUILDS, MultiBuild
from mergebot.config.configfile import Config

BUILDS: dict[str, Callable[[Any], Build]] = {**STAGE_BUILDS, "multi": MultiBuild}


def build_for(config: Config) -> Build:
    """The build of a config of any kind (chosen by its declared `kind`)."""
    return BUILDS[config.kind](config)
