"""Generation-time features shared by every generate script (guidance, previews, prompts, outputs, metadata)."""
