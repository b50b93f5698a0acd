"""Synthetic instruction data: the self-instruct loop, its filters and dedup, and its generators
(a local checkpoint through palmrl.serving's generator, or any OpenAI-compatible endpoint).

    seeds.jsonl   101 hand-written seed tasks {id, instruction, input, output} (package data)
    prompts.py    the task-list prompt and its parser
    filters.py    quality checks, exact and near-duplicate detection (MinHash LSH / ROUGE-L)
    backends.py   generators: local checkpoint, or any OpenAI-compatible endpoint (retries, concurrency)
    pipeline.py   the self-instruct loop: append-only, resumable, provenance per record
"""
