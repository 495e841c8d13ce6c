"""Speed benchmark: our decoding engine against a transformers baseline (`python -m bench`; see compare.py)."""
