"""GenDR in PyTorch: the network from diffusers classes, checkpoints, presets, and the reference
tiling path (the ground truth every export is compared with).

May import: engine_build.errors, service (top level: manifest, pixels). Never the other engine_build packages.
"""
