"""palmrl: a PaLM-architecture transformer from raw text to an RLHF'd assistant.

pretrain -> sft -> reward -> ppo -> sample, every stage driven by composed Hydra configs and
trained through DeepSpeed; stages hand off self-describing checkpoint folders by path.
"""

__version__ = "0.1.0"
