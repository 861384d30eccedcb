"""vLLM adapter: the neighbor-mixing worker extension. The only package that imports vLLM."""
