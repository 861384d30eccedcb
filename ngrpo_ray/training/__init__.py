"""Driver-side logic that needs neither Ray nor vLLM: prompt order, iteration metrics, checkpoint state."""
