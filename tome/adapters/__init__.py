"""One module per model family; each declares ``ADAPTER = Adapter(...)`` at its end (the classes
it patches, its kind, its handle and options, what the tools need to know), which
:mod:`tome.runtime.registry` finds. :mod:`tome.adapters.common` holds the pieces several families
share. Nothing is imported here: adapter modules load when the registry is first read."""
