"""The console scripts of pat-hf."""
