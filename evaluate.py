#!/usr/bin/env python
"""Perplexity of a causal LM on a split (--stride for a sliding window). See README.md."""
from lmcompress.evaluation import main

if __name__ == "__main__":
    main()
