"""Packed shards for parallel file systems: ``format`` (the on-disk layout and its reader), ``write``
(``tsm-dist pack`` and ``--verify``), ``transcode`` (VP9 with a short GOP). docs/data.md has the spec."""
