#!/usr/bin/env python
"""Fine-tune or pre-train a causal LM (HuggingFace Trainer flags). See README.md."""
from lmcompress.training import main

if __name__ == "__main__":
    main()
