#!/usr/bin/env python
"""Tokenize raw text into a token folder (meta.json + {split}.bin). See README.md."""
from lmcompress.tokenize_cli import main

if __name__ == "__main__":
    main()
