"""The evaluate stage: MTEB evaluators with the paper's instructions, on local folders or mteb tasks, fanned out over Ray."""
