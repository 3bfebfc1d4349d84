"""The model card and the license analysis of a merge."""
