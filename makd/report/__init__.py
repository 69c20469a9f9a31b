"""Reports: run folders and multi-seed comparisons as Markdown and PNG plots."""
