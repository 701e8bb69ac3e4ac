"""Text machinery shared by the language-model recipes (human_numbers, imdb/ULMFiT)."""
