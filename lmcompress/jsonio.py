import json

from .atomic import write_file


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path, values):
    """Write JSON whole or not at all (``atomic.write_file``)."""
    write_file(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
