"""What ``qwen_image_generate_image.py`` runs: ``args`` (command line), ``plan`` (per-job checks), ``images``
(control images, masks, RCM), ``generator`` (the models and the stages of the shared job loop)."""
