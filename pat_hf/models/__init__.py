"""Models: creating timm teachers and students (factory) and seeing any of them as four stages (stages)."""
