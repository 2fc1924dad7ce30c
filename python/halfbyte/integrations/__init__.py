"""Integrations of halfbyte with other libraries (Hugging Face transformers: ``halfbyte.integrations.transformers``)."""
