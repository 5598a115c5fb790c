"""Community super-resolution models (spandrel): import, trace fixes, ncnn conversion of the embedded
Real-ESRGAN default, and the tiny seeded zoo of every architecture.

May import: engine_build.export, engine_build.verify, engine_build.repository, service.
"""
