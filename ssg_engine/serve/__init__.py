"""The HTTP service (``ssg-engine serve``): an ASGI app speaking OpenAI's images API over a batching scheduler.

``models`` (the served models and the batch runner), ``request`` (checking a request body), ``scheduler``
(coalescing compatible requests into batches), ``metrics`` (Prometheus text), ``page`` (the web page at ``/``),
``app`` (the FastAPI app and the uvicorn server), ``ray_deployment`` (the same API as a Ray Serve deployment: the
``ray`` extra). Needs the ``serve`` extra: ``pip install 'ssg-engine[serve]'``.
"""
