"""The ``tome`` command (``tome demo | viz | bench | eval | tune | embed``)."""
