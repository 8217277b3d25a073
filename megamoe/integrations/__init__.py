"""Integrations with other frameworks (DeepSpeed, Hugging Face); each imports its framework lazily."""
