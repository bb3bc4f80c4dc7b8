"""Model helpers: tiny HF models and tokenizers built from configs (no downloads)."""
