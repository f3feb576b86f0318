"""vlm: a minimal LLaVA-style vision-language model."""
