"""Training: tokenizer training, the shared loop, pretraining (and SFT/LoRA stages by other modules)."""
