"""An OpenAI-compatible HTTP server over the embeddable runtime (``moe-onnx serve``).

``schemas`` (typed requests and responses) and ``errors`` (OpenAI-style error bodies) know nothing
of serving; ``body`` reads a request's body under size, time and nesting limits; ``chat`` renders
chat templates as transformers does; ``continuous`` runs one decode thread per model that admits
requests between decode steps and retires them as they end (``kv_rows`` joins and slices their
caches; ``batching`` holds the queue and the older whole-batch scheduler); ``engine`` makes
requests into jobs; ``app`` is the Starlette app,
``config`` what the command asked for and the app it makes; ``run`` starts it under uvicorn (with
time limits on idle connections and on request headers), or under Ray Serve (``ray_app``).
Like the runtime, none of it imports torch.
"""
