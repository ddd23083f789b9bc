"""What an export writes and how it is read back by people: manifest, reference outputs, tokenizer, report, plots."""
