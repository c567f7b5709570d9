"""CoFiRec and TIGER: semantic-ID tokenizers and generative retrieval."""
