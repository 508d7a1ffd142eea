"""ray-e5: train E5-mistral-style text embedders from LLM-written synthetic data, at cluster scale on Ray."""

__version__ = "0.1.0"
