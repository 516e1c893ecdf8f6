#!/usr/bin/env python
"""Distil a teacher into a student (HuggingFace Trainer flags plus the distillation flags). See README.md."""
from lmcompress.distillation import main

if __name__ == "__main__":
    main()
