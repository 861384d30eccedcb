"""Pure-PyTorch core: neighbor tables, exploration strategies, records, advantages, losses, metrics. No Ray or vLLM imports."""
