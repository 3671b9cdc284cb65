"""The corpus of bad weekly drops, built in code from a clean generated drop (see ``corpus.py``)."""
