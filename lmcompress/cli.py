"""Argument parsing shared by the entry points: one-line errors instead of a page of usage."""
import argparse
import sys


class _OneLineErrors:
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def parse_dataclass_args(dataclass_types, prog, argv=None, defaults=None):
    """Parse flags into HuggingFace-style argument dataclasses; an unknown flag is a one-line error. ``defaults``:
    values for fields that the flags do not set.

    transformers is imported here, not at module level, so tools that only need ``ArgumentParser``
    (tokenize_datasets.py) start without it.
    """
    from transformers import HfArgumentParser

    class DataclassArgumentParser(_OneLineErrors, HfArgumentParser):
        pass

    parser = DataclassArgumentParser(dataclass_types)
    parser.prog = prog
    parser.set_defaults(**(defaults or {}))
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return parsed
