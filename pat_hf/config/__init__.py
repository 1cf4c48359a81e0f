"""The run's settings: argument dataclasses, the distiller-aware parser, the one YAML reader, the shipped recipes."""
