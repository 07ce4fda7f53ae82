"""Models by name: built-in tiny models and packaged ones, local folders, object storage; LoRA adapters (peft);
exports as Hugging Face folders."""
