"""The mergekit-moe builder (merge-semantics.md §3): dense models in, a Mixtral / Qwen2-MoE / Qwen3-MoE out.

`plan` checks and lays out the output from headers, `gates` computes the routers' vectors, `write` streams the
experts into the fused expert tensors; `layout` knows each MoE architecture's tensor names and config.
"""
