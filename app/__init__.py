"""HTTP API of the LoRP service. It never imports torch or transformers."""
