"""The local LLM service: base model, sessions and adapters (the M04 stand-in)."""
