"""`python -m bench`: run every benchmark in this package with its default settings."""
import importlib
import pkgutil

import bench

if __name__ == "__main__":
    for module in pkgutil.iter_modules(bench.__path__):
        if not module.name.startswith("_"):
            print(f"== bench.{module.name}", flush=True)
            importlib.import_module(f"bench.{module.name}").main([])
