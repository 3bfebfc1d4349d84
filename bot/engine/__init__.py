"""The tensor engine: architecture layout, the per-tensor plan, the merge methods and the executor that
streams chunks through them."""
