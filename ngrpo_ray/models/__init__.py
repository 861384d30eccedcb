"""Offline model resolution (the demo model, the R1 tokenizer)."""
