"""nft: Neural mask Fine-Tuning backdoor purification, an attack zoo, baselines and a benchmark."""
__version__ = "0.1.0"
