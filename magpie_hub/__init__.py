"""magpie-hub: build, tag, filter, card and publish MAGPIE alignment datasets."""

__version__ = "0.1.0"
