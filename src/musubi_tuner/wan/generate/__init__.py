"""The Wan generator (``wan_generate_video.py``): arguments, conditions, generation."""
