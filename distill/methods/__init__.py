"""The built-in methods: one module each, found by dstudio.distill.core.method.discover (no list to edit here).

Modules whose name starts with '_' hold what several methods share and are not searched for methods.
"""
