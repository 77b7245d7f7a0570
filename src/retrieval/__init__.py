"""Retrieval (thesis ch. V): the bilingual CLIP as a query and image encoder, and the image index."""
