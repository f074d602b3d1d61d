"""baldro: balanced LLM unlearning with distributionally robust optimisation."""

__version__ = "0.1.0"
