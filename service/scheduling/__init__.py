"""The tile scheduler: admission in tile units, tickets and reservations, the batcher (the only owner of
its queue), lanes (shortest remaining work with aging), the measured cost table and the planner.

May import: service top-level modules (errors, settings, manifest, metrics, requests), service.pixels,
service.backends. Never service.http or service.jobs.
"""
