"""The GPT model (one readable file: `gpt.py`)."""
