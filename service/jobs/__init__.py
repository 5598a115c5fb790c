"""The job layer behind /v1/jobs (docs/jobs.md): job records, the embedded single-process store, the
shared Redis Streams store, and what a job does beyond an upscale (webhooks, input/output by URL).

May import: service (top-level modules), service.scheduling, service.pixels. Never service.http: the
routes call this package, not the reverse.
"""
