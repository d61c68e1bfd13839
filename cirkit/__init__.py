"""cirkit: zero-shot Composed Image Retrieval, as a toolkit of chainable stages."""

__version__ = "0.1.0"
