"""Serving a checkpoint: the text generator and the OpenAI-compatible HTTP server `palmrl serve` runs.

    generator.py  a checkpoint as text in, text out: batched, streamable, stop strings (over palmrl.generate)
    schemas.py    the request bodies (pydantic) and the OpenAI error shape
    scheduler.py  the worker thread that owns the model and batches compatible requests
    app.py        the Server (limits, response shapes, SSE) and its FastAPI app:
                  /v1/completions, /v1/chat/completions, /v1/models, /health
"""
