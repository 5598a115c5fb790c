"""Offline side of gendr-serve: the GenDR model in PyTorch, checkpoints, export, quantization, engines."""
