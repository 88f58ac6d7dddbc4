"""Row edits: locate rows, compute new contents, patch files, and the journal that applies them."""
