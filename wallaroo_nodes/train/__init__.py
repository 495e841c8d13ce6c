"""Training the tiny Wallaroo on the shapes world: tokenizer, VQ, and the paper's four stages (plus stage 0)."""
