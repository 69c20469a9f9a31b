"""Test support: a real OpenAI-compatible server process around a tiny local model."""
