"""Data for every stage: where documents come from, and how they become training tensors.

    embedded.py     the corpus shipped with the package (chitchat conversations, ratings, prompts)
    sources.py      one reader for every source: embedded, local files, Hugging Face datasets
    tokens.py       packed token shards for pretraining and step-addressed batches
    chat.py, instructions.py, preferences.py   SFT examples, self-instruct data, preference pairs

Import the module you need (`from palmrl.data.sources import load_texts`): this package imports
nothing itself, so light modules do not pay for `datasets` (about a second to import).
"""
