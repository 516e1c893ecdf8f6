#!/usr/bin/env python
"""Make a shallower student from chosen teacher layers. See README.md."""
from lmcompress.truncation import main

if __name__ == "__main__":
    main()
