"""Synthetic instruction data and serving: the self-instruct generator, its filters and dedup, and
the OpenAI-compatible server that `palmrl serve` runs.

    seeds.jsonl   101 hand-written seed tasks {id, instruction, input, output} (package data)
    prompts.py    the task-list prompt and its parser
    filters.py    quality checks, exact and near-duplicate detection (MinHash LSH / ROUGE-L)
    engine.py     a checkpoint as text in, text out: batched, streamable, stop strings
    backends.py   generators: local checkpoint, or any OpenAI-compatible endpoint (retries, concurrency)
    pipeline.py   the self-instruct loop: append-only, resumable, provenance per record
    server.py     FastAPI app: /v1/completions, /v1/chat/completions (SSE), /v1/models, /health
"""
