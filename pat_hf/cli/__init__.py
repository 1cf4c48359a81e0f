"""The console entry points: pat-hf-train, pat-hf-evaluate, pat-hf-push."""
