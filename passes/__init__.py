"""Placement passes, one per file. Each is a pure step `(graph, plan, options) -> plan`.

Installed as `fiddlerc.passes`; the pipeline that runs them, in order, is `fiddlerc/pipeline.py`.
"""
