"""The project's own data: the Python standard library corpus (corpus.py) and its SentencePiece
tokenizer as Hugging Face files (tokenizer.py). Training-time dataset reading is training/data.py."""
