"""Models: any Hugging Face causal LM by hub id or path, packaged models (SmolLM2 offline), the tests' tiny model."""
