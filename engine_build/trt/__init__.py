"""TensorRT: the graph rules checked on the CPU (onnx-tensorrt's operator matrix), the engine build per
GPU and tile, and the GPU targets an engine is built for.

May import: engine_build.repository, engine_build.errors, service. Never engine_build.export (it imports us).
"""
