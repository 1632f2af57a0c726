"""Pieces several adapters share (public: adapters import these, never each other's privates)."""
