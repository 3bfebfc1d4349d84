"""Builds: what turns a validated config into a finished output directory (dense merges, MoE, multi-stage)."""
