"""Leaf layer: the run-folder layout, the part format, history assembly, statistics, errors.

Every other layer may import these modules; they import nothing of gradexp above them.
"""
