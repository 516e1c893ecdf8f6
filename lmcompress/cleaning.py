"""The paper's cleaning of OpenWebText, line by line.

A line is dropped when it
  * repeats an earlier line exactly (``duplicate``);
  * is a near-duplicate of an earlier line (``near_duplicate``): same length without punctuation and
    whitespace, and the same first four and last four words once lower-cased and stripped of punctuation
    (the original ``clean_text.py`` key);
  * holds an HTML tag or entity (``html``);
  * is shorter than ``min_line_length`` characters once stripped (``too_short``);
  * has more than ``max_nonalpha_fraction`` of its non-space characters outside the alphabet (``nonalpha``).
Blank lines structure the text and are kept, except that runs of them collapse to one (``blank_run``).
The first occurrence of a line always wins. Memory grows with the number of distinct lines (16 bytes each
as hashes), not with their text.
"""
import dataclasses
import hashlib
import re
import string

HTML_PATTERN = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?\s*>|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")
PUNCTUATION = str.maketrans("", "", string.punctuation)
DROP_REASONS = ("duplicate", "near_duplicate", "html", "too_short", "nonalpha", "blank_run")


@dataclasses.dataclass(frozen=True)
class CleaningOptions:
    min_line_length: int = 5
    max_nonalpha_fraction: float = 0.25


def near_duplicate_key(line):
    words = line.lower().translate(PUNCTUATION).split()
    squeezed_length = sum(len(word) for word in words)
    edge_words = " ".join(words[:4] + ["|"] + words[-4:])
    return squeezed_length, hashlib.md5(edge_words.encode("utf-8")).digest()[:8]


def nonalpha_fraction(line):
    visible = [char for char in line if not char.isspace()]
    if not visible:
        return 0.0
    return sum(not char.isalpha() for char in visible) / len(visible)


def line_hash(line):
    return hashlib.blake2b(line.encode("utf-8"), digest_size=16).digest()


class LineCleaner:
    """Stateful filter over a stream of lines: ``keep(line)`` says whether to keep it and counts drops."""

    def __init__(self, options=CleaningOptions()):
        self.options = options
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self.counts["kept"] = 0
        self._seen_lines = set()
        self._seen_near = set()
        self._last_kept_blank = True

    def drop_reason(self, line):
        stripped = line.strip()
        if not stripped:
            return "blank_run" if self._last_kept_blank else None
        if HTML_PATTERN.search(stripped):
            return "html"
        if len(stripped) < self.options.min_line_length:
            return "too_short"
        if nonalpha_fraction(stripped) > self.options.max_nonalpha_fraction:
            return "nonalpha"
        exact = line_hash(stripped)
        if exact in self._seen_lines:
            return "duplicate"
        near = near_duplicate_key(stripped)
        if near in self._seen_near:
            return "near_duplicate"
        self._seen_lines.add(exact)
        self._seen_near.add(near)
        return None

    def keep(self, line):
        reason = self.drop_reason(line)
        if reason is None:
            self.counts["kept"] += 1
            self._last_kept_blank = not line.strip()
            return True
        self.counts[reason] += 1
        return False

    def start_document(self):
        self._last_kept_blank = True
