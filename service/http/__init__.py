"""The HTTP layer: FastAPI app factory, lifecycle and drain, middleware and error handlers, routes
(/upscale, jobs, the web page), body reading, auth, image decode/encode. Only this package imports a
web framework; the runtime (service/runtime.py and below) stays free of them."""
