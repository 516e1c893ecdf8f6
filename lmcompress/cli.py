"""Argument parsing shared by the entry points: one-line errors instead of a page of usage."""
import argparse
import sys

from transformers import HfArgumentParser


class _OneLineErrors:
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


class DataclassArgumentParser(_OneLineErrors, HfArgumentParser):
    pass
