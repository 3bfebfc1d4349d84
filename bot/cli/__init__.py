"""`mergebot` commands: one module per command over the importable library (as huggingface_hub's cli/)."""
