"""Pictures of what was merged (``tome viz``, ``tome demo``): ViTs and diffusion models."""
