"""``transformers`` interop: architecture mapping, DeepSeek routing configs, tokenizer files."""
