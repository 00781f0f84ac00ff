"""Model implementations: GPT-2, and one Llama-family class for the other architectures engine.config supports."""
