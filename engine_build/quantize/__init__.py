"""Post-training quantization: int8/fp8 Q/DQ graphs (NVIDIA ModelOpt, ONNX Runtime's quantizer, OpenVINO's
NNCF for the CPU), calibration tiles from real photos, the parity each graph is served on, and NNCF's
per-CPU-family speed figure.

May import: engine_build.export, engine_build.gendr, engine_build.verify, engine_build.repository, service.
"""
