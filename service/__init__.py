"""Online side of gendr-serve: model repository reader, backends, tile batcher, HTTP API.

Nothing in this package imports torch at module level: the serving image does not ship it.
"""

__version__ = "0.1.0"
