"""The named errors the data loaders raise on bad input.

Every error message names the file (and where useful the entry inside it), says what is wrong and how to fix it.
They subclass the built-in exception a caller would expect (``ValueError``), so ``except ValueError`` still works.
"""

from __future__ import annotations


class DataFormatError(ValueError):
    """An annotation file is readable but its content does not match the documented format."""


class MalformedJSONError(DataFormatError):
    """A JSON / JSONL file does not parse; the message carries the path, line, column and character offset."""


class MaskSizeError(DataFormatError):
    """A mask (RLE or PNG) has a size different from the image or frame it belongs to."""


class EmptyMediaError(DataFormatError):
    """A sample refers to no frames (an empty ``frames`` list, an empty video folder)."""


class EmptyDatasetError(DataFormatError):
    """A source produced no records at all (usually a wrong split name or an empty annotation file)."""


class UnknownDatasetError(ValueError):
    """A dataset name in a mix or on the command line is not one the package can load."""


class DataValidationError(DataFormatError):
    """The validation pass found records that cannot be used (missing or unreadable frames, masks of the wrong
    size or with invalid run-lengths, media types the command does not take, prompts over the length limit). The
    message lists the first problems, each with its file and line or record id, and the total count."""
