"""mergebot: merge open LLMs from mergekit-style YAML, card them, publish them.

The package follows the data: config -> plan -> load -> merge -> write -> card -> publish -> action.
"""

__version__ = "0.1.0"
