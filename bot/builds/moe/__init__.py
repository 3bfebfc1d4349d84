"""The mergekit-moe builder: dense models in, a Mixtral / Qwen2-MoE / Qwen3-MoE out."""
