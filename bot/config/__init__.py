"""The merge config language, read from YAML alone: no models, no network, no torch.

`configfile.load` reads any config file (a merge, a mergekit-moe, a mergekit-multi file) into one of the specs
of `dense`, `moe` and `multi`; `mergebot validate` stops there.
"""
