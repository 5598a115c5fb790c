"""Parity of exported graphs against PyTorch on real photos, through the service's own backends.

May import: engine_build.gendr, engine_build.repository, service.
"""
