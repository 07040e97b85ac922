"""Data steps: demo corpus, decoding, chunking, pair building, latent encoding."""
