"""The pixel path of one request: tiling and stitching, resize plan, colour fix (numpy + Pillow, no torch).

May import: service top-level modules only. Never service.scheduling, service.http or service.jobs.
"""
