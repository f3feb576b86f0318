"""Training data: records from LLaVA files or datasets, template rendering with loss masks, preflight."""
