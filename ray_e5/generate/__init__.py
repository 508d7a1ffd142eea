"""The generate stage: LLM-written synthetic training data (taxonomy, prompts, backends, parsing, the Ray Data operator)."""
