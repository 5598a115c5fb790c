"""Checkpoint → ONNX in a model repository: the variant steps keyed by their inputs, the fp16 rewrite
with fp32 islands, shape buckets, and the graph checks run before a file is written.

May import: engine_build.gendr, engine_build.trt (its rules), engine_build.repository, service.
"""
