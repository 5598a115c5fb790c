"""Post-training quantization: int8/fp8 Q/DQ graphs (NVIDIA ModelOpt, ONNX Runtime's quantizer),
calibration tiles from real photos, and the parity each graph is served on.

May import: engine_build.export, engine_build.gendr, engine_build.verify, engine_build.repository, service.
"""
